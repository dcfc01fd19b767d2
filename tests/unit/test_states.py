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
