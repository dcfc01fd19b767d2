"""Job states and transitions: the rules every writer goes through."""

import pytest

from genq import db
from genq.job_store import transition
from genq.models import Job, Tenant
from genq.states import TERMINAL_STATES, JobStatus, can_transition


def test_terminal_states_have_no_way_out():
    for source in TERMINAL_STATES:
        for target in JobStatus:
            assert not can_transition(source, target), (source, target)


def test_a_job_runs_before_it_succeeds():
    assert can_transition(JobStatus.QUEUED, JobStatus.RUNNING)
    assert can_transition(JobStatus.RUNNING, JobStatus.SUCCEEDED)
    assert not can_transition(JobStatus.QUEUED, JobStatus.SUCCEEDED)


def _make_job(url: str, tenant_name: str = "t") -> str:
    with db.transaction(url) as session:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
        job = Job(tenant_id=tenant.id, model="m", prompt="p")
        session.add(job)
        session.flush()
        return job.id


def test_stale_worker_cannot_overwrite_a_finished_job(database_url):
    job_id = _make_job(database_url)
    with db.transaction(database_url) as session:
        assert transition(session, job_id, JobStatus.RUNNING, worker_id="w1")
        assert transition(session, job_id, JobStatus.SUCCEEDED, output_text="first")
    with db.transaction(database_url) as session:
        assert not transition(session, job_id, JobStatus.SUCCEEDED, output_text="second")
        assert not transition(session, job_id, JobStatus.FAILED, error_code="x")
    with db.transaction(database_url) as session:
        job = session.get(Job, job_id)
        assert (job.status, job.output_text) == (JobStatus.SUCCEEDED, "first")
        assert job.finished_at is not None and job.finished_at.tzinfo is not None


def test_transition_refuses_a_source_the_rules_do_not_allow(sqlite_url):
    job_id = _make_job(sqlite_url)
    with db.transaction(sqlite_url) as session, pytest.raises(ValueError):
        transition(session, job_id, JobStatus.SUCCEEDED, only_from={JobStatus.QUEUED})


def test_out_of_date_schema_is_refused_with_a_clear_message(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    with pytest.raises(db.SchemaOutOfDate, match="genq db upgrade"):
        db.ensure_schema_current(url)
    db.upgrade(url)
    db.ensure_schema_current(url)


def test_many_jobs_move_in_one_statement_each_with_its_own_values(database_url):
    from genq.job_store import transition_each, transition_many_returning

    job_ids = [_make_job(database_url, tenant_name=f"t{i}") for i in range(3)]
    with db.transaction(database_url) as session:
        claimed = transition_many_returning(session, job_ids[:2], JobStatus.RUNNING,
                                            worker_id="w1")
        assert sorted(job.id for job in claimed) == sorted(job_ids[:2])
        values = {job_id: {"output_text": f"out {i}", "completion_tokens": i}
                  for i, job_id in enumerate(job_ids)}
        # The third job never ran: it is not moved, and the others keep their own values.
        assert transition_each(session, values, JobStatus.SUCCEEDED) == set(job_ids[:2])
    with db.session_factory(database_url)() as session:
        jobs = {job.id: job for job in session.query(Job).where(Job.id.in_(job_ids))}
    assert [(jobs[i].status, jobs[i].output_text, jobs[i].completion_tokens) for i in job_ids] == [
        (JobStatus.SUCCEEDED, "out 0", 0), (JobStatus.SUCCEEDED, "out 1", 1),
        (JobStatus.QUEUED, None, None)]


def test_a_worker_claims_queued_jobs_of_its_model_and_those_whose_holder_is_gone(database_url):
    from datetime import timedelta

    from genq.job_store import claim_deliveries, count_attempt
    from genq.models import utcnow

    # given queued jobs of model "m", one delivered before, one lost twice, and two running:
    # one under a live holder, one under a dead one (both leases still valid)
    fresh = [_make_job(database_url, tenant_name=f"t{i}") for i in range(3)]
    redelivered, suspect = _make_job(database_url, "r"), _make_job(database_url, "x")
    alive, dead = _make_job(database_url, "s"), _make_job(database_url, "d")
    with db.transaction(database_url) as session:
        session.get(Job, redelivered).attempts = 1
        session.get(Job, suspect).attempts = 2
        for job_id, holder in ((alive, "w-alive"), (dead, "w-dead")):
            assert transition(session, job_id, JobStatus.RUNNING, worker_id=holder, attempts=1,
                              lease_expires_at=utcnow() + timedelta(hours=1))
    lease = utcnow() + timedelta(seconds=60)

    with db.transaction(database_url) as session:
        # a worker of another model claims nothing
        assert claim_deliveries(session, fresh, model="other", worker_id="w2",
                                lease_expires_at=lease).jobs == []
        claim = claim_deliveries(session, [*fresh, redelivered, suspect, alive, dead],
                                 model="m", worker_id="w1", lease_expires_at=lease,
                                 is_holder_dead=lambda holder: holder == "w-dead",
                                 suspect_after=2)
        # then the queued jobs and the dead holder's job move, each with one more attempt
        assert {(job.id, job.status, job.worker_id, job.attempts) for job in claim.jobs} == {
            *((job_id, "running", "w1", 1) for job_id in fresh),
            (redelivered, "running", "w1", 2), (dead, "running", "w1", 2)}
        assert all(job.started_at is not None and job.lease_expires_at == lease
                   for job in claim.jobs)
        # and the job lost twice is held, its attempt spent only when it starts
        assert [(job.id, job.status, job.attempts) for job in claim.held] == [
            (suspect, "running", 2)]
        assert count_attempt(session, suspect, worker_id="w1").attempts == 3
        # and a second delivery of the same messages claims nothing
        assert claim_deliveries(session, [*fresh, dead], model="m", worker_id="w1",
                                lease_expires_at=lease).jobs == []


@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_worker_stores_each_result_only_for_jobs_it_holds(database_url, batch_size):
    from genq.job_store import store_results

    # given jobs this worker runs, one another worker holds, one canceled meanwhile
    ours = [_make_job(database_url, tenant_name=f"t{i}") for i in range(batch_size)]
    theirs, canceled = _make_job(database_url, "x"), _make_job(database_url, "y")
    with db.transaction(database_url) as session:
        for job_id in ours + [canceled]:
            assert transition(session, job_id, JobStatus.RUNNING, worker_id="w1")
        assert transition(session, theirs, JobStatus.RUNNING, worker_id="w2")
        assert transition(session, canceled, JobStatus.CANCELED)
    results = {job_id: {"output_text": f"out {i}", "finish_reason": "stop",
                        "prompt_tokens": 3, "completion_tokens": i}
               for i, job_id in enumerate([*ours, theirs, canceled])}

    with db.transaction(database_url) as session:
        moved = store_results(session, results, worker_id="w1")

    # then only this worker's running jobs succeed, each with its own values
    assert moved == set(ours)
    with db.session_factory(database_url)() as session:
        jobs = {job.id: job for job in session.query(Job).where(Job.id.in_(results))}
    for i, job_id in enumerate(ours):
        job = jobs[job_id]
        assert (job.status, job.output_text, job.completion_tokens, job.prompt_tokens) == (
            JobStatus.SUCCEEDED, f"out {i}", i, 3)
        assert job.finished_at is not None and job.lease_expires_at is None
    assert (jobs[theirs].status, jobs[theirs].output_text) == (JobStatus.RUNNING, None)
    assert (jobs[canceled].status, jobs[canceled].output_text) == (JobStatus.CANCELED, None)


def test_only_jobs_that_asked_for_logprobs_get_the_logprobs_column(database_url):
    """Every result UPDATE used to carry the JSON column: jobs without logprobs got a JSON
    `null` written beside their output instead of leaving the column alone."""
    from sqlalchemy import text

    from genq.job_store import store_results

    # given a micro-batch of running jobs, one of which asked for logprobs
    plain, scored = _make_job(database_url, "p"), _make_job(database_url, "s")
    with db.transaction(database_url) as session:
        for job_id in (plain, scored):
            assert transition(session, job_id, JobStatus.RUNNING, worker_id="w1")
    result = {"output_text": "Paris", "finish_reason": "stop", "prompt_tokens": 3,
              "completion_tokens": 1}
    stored = [["Paris", -0.1, [["Paris", -0.1], [" Lyon", -2.5]]]]

    with db.transaction(database_url) as session:
        moved = store_results(session, {plain: result,
                                        scored: {**result, "output_logprobs": stored}},
                              worker_id="w1")

    # then both succeed; only the job that asked has logprobs, the other's column is untouched
    assert moved == {plain, scored}
    with db.session_factory(database_url)() as session:
        raw = dict(session.execute(text("SELECT id, output_logprobs FROM jobs WHERE id IN "
                                        "(:plain, :scored)"), {"plain": plain, "scored": scored}
                                   ).all())
        jobs = {job.id: job for job in session.query(Job).where(Job.id.in_(moved))}
    assert raw[plain] is None
    assert jobs[scored].output_logprobs == stored and jobs[plain].output_logprobs is None
    assert {job.status for job in jobs.values()} == {JobStatus.SUCCEEDED}


def test_a_job_lost_while_its_micro_batch_started_is_a_suspect_from_its_first_loss(
        database_url):
    from datetime import timedelta

    from genq.job_store import claim_deliveries, hand_back, mark_started
    from genq.models import utcnow

    # given a worker that claimed two micro-batches, handed the first to its engine, and died
    # starting the second; the reaper then requeued one job of each
    first = [_make_job(database_url, tenant_name=f"a{i}") for i in range(2)]
    second = [_make_job(database_url, tenant_name=f"b{i}") for i in range(2)]
    lease = utcnow() + timedelta(hours=1)
    with db.transaction(database_url) as session:
        for batch in (first, second):
            claim_deliveries(session, batch, model="m", worker_id="w-dead",
                             lease_expires_at=lease, suspect_after=2)
        mark_started(session, first, worker_id="w-dead")
        for job_id in (first[0], second[0]):
            assert transition(session, job_id, JobStatus.QUEUED, worker_id=None,
                              lease_expires_at=None)

    # when a replacement claims all four (the queued ones and those of the dead holder)
    with db.transaction(database_url) as session:
        claim = claim_deliveries(session, [*first, *second], model="m", worker_id="w2",
                                 lease_expires_at=lease, suspect_after=2,
                                 is_holder_dead=lambda holder: holder == "w-dead")

    # then the jobs of the micro-batch it was starting are held as suspects after one loss,
    # and the others run at once with their second attempt
    assert sorted((job.id, job.attempts, job.is_starting) for job in claim.jobs) == sorted(
        (job_id, 2, True) for job_id in first)
    assert sorted((job.id, job.attempts, job.is_starting) for job in claim.held) == sorted(
        (job_id, 1, True) for job_id in second)
    # and a held suspect handed back at a drain stays one; a job handed back after it was
    # claimed (a clean stop) does not become one
    with db.transaction(database_url) as session:
        assert hand_back(session, second[0], worker_id="w2", attempt_spent=False)
        assert hand_back(session, first[0], worker_id="w2")
        assert session.get(Job, second[0]).is_starting
        assert not session.get(Job, first[0]).is_starting


def test_a_worker_looks_up_webhook_endpoints_only_for_tenants_that_have_some(database_url):
    from datetime import timedelta

    from sqlalchemy import event, func, select

    from genq.job_store import claim_deliveries, store_results
    from genq.models import WebhookEndpoint, WebhookEvent, utcnow

    # given a job of a tenant without webhook endpoints and one of a tenant with one
    quiet, listened = _make_job(database_url, "quiet"), _make_job(database_url, "listened")
    with db.transaction(database_url) as session:
        session.add(WebhookEndpoint(tenant_id=session.get(Job, listened).tenant_id,
                                    url="https://example.com/hook", secret="whsec_test",
                                    events=["running", "succeeded"]))
    statements: list[str] = []

    def record(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement)

    # when a worker claims each and stores its result, each in transactions of their own
    engine = db.get_engine(database_url)
    event.listen(engine, "before_cursor_execute", record)
    try:
        for job_id in (quiet, listened):
            with db.transaction(database_url) as session:
                claim_deliveries(session, [job_id], model="m", worker_id="w",
                                 lease_expires_at=utcnow() + timedelta(hours=1))
            with db.transaction(database_url) as session:
                store_results(session, {job_id: {"output_text": "x", "finish_reason": "stop",
                                                 "prompt_tokens": 1, "completion_tokens": 1}},
                              worker_id="w")
    finally:
        event.remove(engine, "before_cursor_execute", record)

    # then only the second tenant's endpoints were read (once per transaction), and its
    # endpoint got both events, as before
    assert sum(statement.lstrip().upper().startswith("SELECT") and "webhook_endpoints" in
               statement for statement in statements) == 2
    with db.session_factory(database_url)() as session:
        assert session.scalars(select(WebhookEvent.job_id)).all() == [listened, listened]
        assert session.scalar(select(func.count()).select_from(WebhookEvent).where(
            WebhookEvent.job_id == quiet)) == 0
