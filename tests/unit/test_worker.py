"""The Worker's job path (claim → generate → commit → ack) against a real SQLite DB and the echo
engine behind a real EngineLoop; deliveries are handed to it directly (the brokers' side:
tests/integration/test_intake.py)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from functools import partial

import pytest
from sqlalchemy import event, func, select

from genq import db
from genq.models import Job, Outbox, Tenant, utcnow
from genq.settings import Settings
from genq.states import JobStatus
from tests.conftest import MODEL_CACHE_DIR
from workers.intake import Delivery

# Bounds against a hang, not speed checks: an echo job settles in milliseconds on an idle
# machine, but once took over 10 s on CI's two loaded cores (a run of the whole suite).
SETTLE_TIMEOUT_SECONDS = 60


class RecordingIntake:
    """Records how the Worker settles each delivery: True acked, False handed back."""

    def __init__(self) -> None:
        self.settled: dict[Delivery, bool] = {}
        self._changed = threading.Condition()

    def take(self, n: int, timeout: float, *, interactive_only: bool = False) -> list:
        return []

    def ack(self, delivery: Delivery) -> None:
        self._settle(delivery, True)

    def give_up(self, delivery: Delivery) -> None:
        self._settle(delivery, False)

    def close(self) -> None:
        pass

    def _settle(self, delivery: Delivery, acked: bool) -> None:
        with self._changed:
            assert delivery not in self.settled, "settled twice"
            self.settled[delivery] = acked
            self._changed.notify_all()

    def wait_for(self, deliveries: list[Delivery], timeout: float = SETTLE_TIMEOUT_SECONDS
                 ) -> bool:
        with self._changed:
            return self._changed.wait_for(
                lambda: all(d in self.settled for d in deliveries), timeout)


def _worker(settings: Settings, loop):
    from workers.worker import Worker

    return Worker(settings, RecordingIntake(), loop)


def _echo_settings(url: str) -> Settings:
    return Settings(database_url=url, broker_url="redis://unused", model="echo")


def _queued_job(url: str, tenant_name: str = "t", **values) -> str:
    with db.transaction(url) as session:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
        job = Job(tenant_id=tenant.id, model="echo", prompt="hello there",
                  sampling_params={"max_tokens": 4, "temperature": 0}, **values)
        session.add(job)
        session.flush()
        return job.id


def test_deadline_passing_before_the_engine_admits_the_job_expires_it(sqlite_url):
    # Regression: a request aborted before admission used to leave its job `running` forever.
    from engine.echo import EchoEngine
    from workers.engine_loop import EngineLoop

    job_id = _queued_job(sqlite_url, deadline_at=utcnow() + timedelta(seconds=1))
    loop = EngineLoop(lambda: EchoEngine(cache_dir=MODEL_CACHE_DIR))  # never started: nothing runs

    _worker(_echo_settings(sqlite_url), loop).run(job_id)

    with db.session_factory(sqlite_url)() as session:
        job = session.get(Job, job_id)
    assert job.status == JobStatus.EXPIRED
    assert job.finished_at is not None and job.output_text is None


@pytest.fixture
def echo_worker(sqlite_url):
    """A Worker on `sqlite_url` whose EngineLoop runs the echo engine (its threads not
    started: the tests hand it deliveries and run its chores themselves)."""
    from engine.echo import EchoEngine
    from workers.engine_loop import EngineLoop

    loop = EngineLoop(lambda: EchoEngine(cache_dir=MODEL_CACHE_DIR))
    loop.start()
    yield _worker(_echo_settings(sqlite_url), loop)
    loop.stop(timeout=5)


def _job(url: str, job_id: str) -> Job:
    with db.session_factory(url)() as session:
        return session.get(Job, job_id)


def test_a_job_runs_once_and_a_second_delivery_is_a_no_op(sqlite_url, echo_worker):
    job_id = _queued_job(sqlite_url)

    echo_worker.run(job_id)
    echo_worker.run(job_id)

    job = _job(sqlite_url, job_id)
    assert (job.status, job.attempts, job.output_text) == (JobStatus.SUCCEEDED, 1, "hello there")


def test_a_job_delivered_twice_in_one_micro_batch_runs_once_and_both_are_acked(sqlite_url,
                                                                              echo_worker):
    job_id = _queued_job(sqlite_url)
    deliveries = [Delivery(job_id, 1), Delivery(job_id, 2)]

    echo_worker.deliver(deliveries)

    assert echo_worker.intake.wait_for(deliveries)
    assert [echo_worker.intake.settled[d] for d in deliveries] == [True, True]
    job = _job(sqlite_url, job_id)
    assert (job.status, job.attempts, job.output_text) == (JobStatus.SUCCEEDED, 1, "hello there")


def test_a_micro_batch_is_claimed_in_one_statement_and_each_result_acks_its_message(
        sqlite_url, echo_worker):
    job_ids = [_queued_job(sqlite_url, tenant_name=f"t{i}") for i in range(5)]
    claims: list[str] = []

    def count_claims(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("UPDATE jobs") and "attempts" in statement.split("WHERE")[0]:
            claims.append(statement)

    engine = db.get_engine(sqlite_url)
    event.listen(engine, "before_cursor_execute", count_claims)
    deliveries = [Delivery(job_id, job_id) for job_id in job_ids]
    try:
        echo_worker.deliver(deliveries)
        assert echo_worker.intake.wait_for(deliveries)
    finally:
        event.remove(engine, "before_cursor_execute", count_claims)

    assert len(claims) == 1
    with db.session_factory(sqlite_url)() as session:
        statuses = session.scalars(select(Job.status).where(Job.id.in_(job_ids))).all()
    assert statuses == [JobStatus.SUCCEEDED] * 5


def test_the_runner_is_idle_only_once_every_outcome_is_committed_and_acked(sqlite_url,
                                                                          echo_worker):
    # Regression: the drain took "no job in the engine" for idle, and the worker could exit
    # with a finished job's result still waiting for its commit.
    job_id = _queued_job(sqlite_url)
    delivery = Delivery(job_id, "tag")
    gate = threading.Event()

    class HoldTheWriter:  # queued before the job reaches the engine, so before its result
        def before_job(self, job) -> None:
            echo_worker.writes.submit(lambda session: gate.wait(10))

    echo_worker.middleware.append(HoldTheWriter())
    echo_worker.deliver([delivery])
    deadline = time.monotonic() + 10
    while echo_worker.engine.in_flight() and time.monotonic() < deadline:
        time.sleep(0.01)

    assert not echo_worker.engine.in_flight() and delivery not in echo_worker.intake.settled
    assert not echo_worker.is_idle()
    gate.set()
    assert echo_worker.intake.wait_for([delivery])
    assert echo_worker.is_idle()
    assert _job(sqlite_url, job_id).status == JobStatus.SUCCEEDED


def test_a_direct_run_raises_when_the_outcome_cannot_be_written(sqlite_url, echo_worker):
    # Regression: `run` waited forever for an ack that a failed result write never gives.
    job_id = _queued_job(sqlite_url)

    class LoseTheJobsTable:  # after the claim, the result's UPDATE has no table to write to
        def before_job(self, job) -> None:
            with db.get_engine(sqlite_url).begin() as conn:
                conn.exec_driver_sql("ALTER TABLE jobs RENAME TO jobs_gone")

    echo_worker.middleware.append(LoseTheJobsTable())

    with pytest.raises(RuntimeError, match="could not be written"):
        echo_worker.run(job_id)
    assert echo_worker.is_idle()


def test_generated_nul_characters_do_not_block_the_result_on_postgresql(postgres_url):
    """PostgreSQL text holds no NUL: a model that generated one made the result's UPDATE fail,
    so the job could never be stored (its message redelivered until max_attempts). The echo
    engine "generates" the chat's last message, which JSON columns keep NULs in."""
    from engine.echo import EchoEngine
    from workers.engine_loop import EngineLoop

    with db.transaction(postgres_url) as session:
        tenant = Tenant(name="t")
        session.add(tenant)
        session.flush()
        job = Job(tenant_id=tenant.id, model="echo",
                  messages=[{"role": "user", "content": "zero\x00byte"}],
                  sampling_params={"max_tokens": 8, "temperature": 0})
        session.add(job)
        session.flush()
        job_id = job.id
    loop = EngineLoop(lambda: EchoEngine(cache_dir=MODEL_CACHE_DIR))
    loop.start()
    try:
        _worker(_echo_settings(postgres_url), loop).run(job_id)
    finally:
        loop.stop(timeout=5)

    job = _job(postgres_url, job_id)
    assert job.status == JobStatus.SUCCEEDED
    assert job.output_text == "zero\ufffdbyte"


def _deliver_and_settle(worker, job_ids: list[str]) -> dict[str, bool]:
    """Deliver the jobs as one micro-batch; wait until each delivery is settled and return
    how: True acked, False handed back (for the broker to deliver again)."""
    deliveries = [Delivery(job_id, job_id) for job_id in job_ids]
    worker.deliver(deliveries)
    assert worker.intake.wait_for(deliveries), worker.intake.settled
    return {d.job_id: worker.intake.settled[d] for d in deliveries}


def test_a_failed_claim_settles_every_delivery_of_its_batch(sqlite_url, echo_worker,
                                                            monkeypatch):
    # Regression: a claim's error escaped `deliver`, and the deliveries of the micro-batch
    # were never settled: their window slots were lost for good.
    from sqlalchemy.exc import OperationalError

    job_ids = [_queued_job(sqlite_url, tenant_name=f"t{i}") for i in range(3)]

    def failing_claim(session, job_ids):
        raise OperationalError("UPDATE jobs …", {}, Exception("disk I/O error"))

    monkeypatch.setattr(echo_worker, "_claim", failing_claim)

    # then every delivery is acked (the jobs stay queued: the reaper republishes them)
    assert _deliver_and_settle(echo_worker, job_ids) == dict.fromkeys(job_ids, True)
    assert [_job(sqlite_url, job_id).status for job_id in job_ids] == [JobStatus.QUEUED] * 3
    assert echo_worker.is_idle()


def test_redelivered_jobs_run_in_the_micro_batch_of_first_deliveries(sqlite_url, echo_worker):
    # Regression (issue 21): each redelivered job ran alone, one at a time, and the others
    # bounced back through the outbox while it ran: a crashed worker's window took minutes.
    # given two first deliveries, two jobs lost once, and one lost twice (the suspect)
    fresh = [_queued_job(sqlite_url, tenant_name=f"f{i}") for i in range(2)]
    lost_once = [_queued_job(sqlite_url, tenant_name=f"o{i}", attempts=1) for i in range(2)]
    suspect = _queued_job(sqlite_url, tenant_name="s", attempts=2)
    submitted: list[list[str]] = []
    submit_many = echo_worker.engine.submit_many
    echo_worker.engine.submit_many = lambda requests: (
        submitted.append([r.request_id for r in requests]), submit_many(requests))[1]

    # when they arrive as one micro-batch
    job_ids = [*fresh, *lost_once, suspect]
    assert _deliver_and_settle(echo_worker, job_ids) == dict.fromkeys(job_ids, True)

    # then the others go to the engine at once, the suspect alone once they are done, and
    # none is handed back through the outbox
    assert [sorted(batch) for batch in submitted] == [sorted([*fresh, *lost_once]), [suspect]]
    jobs = {job_id: _job(sqlite_url, job_id) for job_id in job_ids}
    assert {job_id: (job.status, job.attempts) for job_id, job in jobs.items()} == {
        **{job_id: (JobStatus.SUCCEEDED, 1) for job_id in fresh},
        **{job_id: (JobStatus.SUCCEEDED, 2) for job_id in lost_once},
        suspect: (JobStatus.SUCCEEDED, 3)}
    with db.session_factory(sqlite_url)() as session:
        assert session.scalar(select(func.count()).select_from(Outbox)) == 0


def test_a_job_lost_max_attempts_times_fails_as_worker_lost(sqlite_url, echo_worker):
    job_id = _queued_job(sqlite_url, attempts=3)  # GENQ_JOB_MAX_ATTEMPTS is 3

    assert _deliver_and_settle(echo_worker, [job_id]) == {job_id: True}

    job = _job(sqlite_url, job_id)
    assert (job.status, job.error_code, job.output_text) == (
        JobStatus.FAILED, "worker_lost", None)


def test_a_job_held_by_a_dead_local_worker_is_claimed_before_its_lease_ends(sqlite_url,
                                                                            echo_worker):
    # Regression (issue 21): a redelivered job of a killed worker was not ours to run until
    # its lease (60 s by default) ran out; the replacement acked its message and waited.
    import subprocess
    import sys

    from workers.leases import HOSTNAME

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_worker = f"{HOSTNAME}:{gone.stdout.strip()}"
    job_id = _queued_job(sqlite_url, status=JobStatus.RUNNING.value, attempts=1,
                         worker_id=dead_worker, lease_expires_at=utcnow() + timedelta(hours=1))
    alive = _queued_job(sqlite_url, tenant_name="u", status=JobStatus.RUNNING.value,
                        attempts=1, worker_id="other-host:1",
                        lease_expires_at=utcnow() + timedelta(hours=1))

    assert _deliver_and_settle(echo_worker, [job_id, alive]) == {job_id: True, alive: True}

    job = _job(sqlite_url, job_id)
    assert (job.status, job.attempts, job.worker_id) == (
        JobStatus.SUCCEEDED, 2, echo_worker.worker_id)
    assert _job(sqlite_url, alive).status == JobStatus.RUNNING  # its holder may be alive


def test_a_drained_job_goes_back_without_spending_an_attempt(sqlite_url, echo_worker):
    # Regression (issue 20, bug 1): a clean stop counted as a lost delivery, so three restarts
    # during a long job failed it as worker_lost.
    job_id = _queued_job(sqlite_url)
    delivery = Delivery(job_id, "tag")

    class DrainNow:  # the drain deadline passes while the job is in the engine
        def before_job(self, job) -> None:
            echo_worker.begin_drain(0)

    echo_worker.middleware.append(DrainNow())
    echo_worker.engine.stop(timeout=5)  # the job waits in the loop's queue until aborted
    echo_worker.deliver([delivery])
    echo_worker.enforce_deadlines()

    assert echo_worker.intake.wait_for([delivery])
    assert echo_worker.intake.settled[delivery] is True  # its hand-back is committed
    job = _job(sqlite_url, job_id)
    assert (job.status, job.attempts, job.worker_id) == (JobStatus.QUEUED, 0, None)
    with db.session_factory(sqlite_url)() as session:
        assert session.scalars(select(Outbox.job_id)).all() == [job_id]


def test_a_before_job_hook_that_raises_fails_its_job_and_not_its_batch(sqlite_url, echo_worker):
    # Regression: the hook's error escaped `deliver`, leaving the rest of the micro-batch
    # claimed but never started or settled.
    job_ids = [_queued_job(sqlite_url, tenant_name=f"t{i}") for i in range(3)]

    class Picky:
        def before_job(self, job) -> None:
            if job.id == job_ids[0]:
                raise RuntimeError("this hook is broken")

    echo_worker.middleware.append(Picky())

    assert _deliver_and_settle(echo_worker, job_ids) == dict.fromkeys(job_ids, True)
    failed, *others = [_job(sqlite_url, job_id) for job_id in job_ids]
    assert (failed.status, failed.error_code) == (JobStatus.FAILED, "internal_error")
    assert "this hook is broken" in failed.error_message
    assert [job.status for job in others] == [JobStatus.SUCCEEDED] * 2
    assert echo_worker.is_idle()


def test_a_suspect_starts_beside_busy_jobs_and_never_beside_another_suspect(sqlite_url,
                                                                             echo_worker):
    # Regression (issue 21): a suspect waited until its worker held no other job, so under
    # unbroken load it never started (its lease renewed forever).
    # given a worker busy with a job (its engine stopped: the job waits in the loop's queue)
    busy = _queued_job(sqlite_url)
    first, second = (_queued_job(sqlite_url, tenant_name=f"s{i}", attempts=2) for i in range(2))
    echo_worker.engine.stop(timeout=5)

    # when two jobs lost twice arrive
    echo_worker.deliver([Delivery(busy, 1), Delivery(first, 2), Delivery(second, 3)])

    # then the first starts at once beside the busy job, with its attempt spent, and the
    # second is held (claimed, no attempt spent) while the first runs
    _wait_for_attempts(sqlite_url, first, 3)
    time.sleep(0.5)
    assert [(job.status, job.attempts) for job in map(partial(_job, sqlite_url),
                                                       [busy, first, second])] == [
        (JobStatus.RUNNING, 1), (JobStatus.RUNNING, 3), (JobStatus.RUNNING, 2)]
    assert sorted(echo_worker.engine.in_flight()) == sorted([busy, first])


def test_a_suspect_lost_while_starting_waits_for_redelivered_jobs_not_for_fresh_ones(
        sqlite_url, echo_worker):
    # given a worker busy with a fresh job and a redelivered one (its engine stopped: they
    # wait in the loop's queue)
    fresh = _queued_job(sqlite_url)
    redelivered = _queued_job(sqlite_url, tenant_name="r", attempts=1)
    suspect = _queued_job(sqlite_url, tenant_name="s", attempts=1, is_starting=True)
    echo_worker.engine.stop(timeout=5)

    # when a job lost once while its worker was starting it arrives with them
    echo_worker.deliver([Delivery(fresh, 1), Delivery(redelivered, 2), Delivery(suspect, 3)])

    # then the others are handed to the engine (their start trace cleared), and the suspect
    # is held, no attempt spent, while the redelivered job runs: lost once already, it is
    # not to die with a poison job again
    wait_until = time.monotonic() + 10
    while _job(sqlite_url, redelivered).is_starting and time.monotonic() < wait_until:
        time.sleep(0.05)
    time.sleep(0.3)
    jobs = {job_id: _job(sqlite_url, job_id) for job_id in (fresh, redelivered, suspect)}
    assert {job_id: (job.status, job.attempts, job.is_starting)
            for job_id, job in jobs.items()} == {
        fresh: (JobStatus.RUNNING, 1, False), redelivered: (JobStatus.RUNNING, 2, False),
        suspect: (JobStatus.RUNNING, 1, True)}
    assert sorted(echo_worker.engine.in_flight()) == sorted([fresh, redelivered])


def test_a_held_suspect_goes_back_at_a_drain_without_spending_an_attempt(sqlite_url,
                                                                         echo_worker):
    # given a worker (its engine stopped) running one suspect and holding another
    first, second = (_queued_job(sqlite_url, tenant_name=f"s{i}", attempts=2) for i in range(2))
    echo_worker.engine.stop(timeout=5)
    deliveries = [Delivery(first, 1), Delivery(second, 2)]
    echo_worker.deliver(deliveries)
    _wait_for_attempts(sqlite_url, first, 3)

    # when the worker drains
    echo_worker.begin_drain(0)
    echo_worker.enforce_deadlines()

    # then both go back to the queue with the attempts they came with: the held one spent
    # none, the running one gets its attempt back (a clean stop loses no delivery)
    assert echo_worker.intake.wait_for(deliveries)
    assert [(job.status, job.attempts) for job in map(partial(_job, sqlite_url),
                                                       [first, second])] == [
        (JobStatus.QUEUED, 2), (JobStatus.QUEUED, 2)]


def _wait_for_attempts(database_url: str, job_id: str, attempts: int) -> None:
    wait_until = time.monotonic() + 10
    while _job(database_url, job_id).attempts != attempts and time.monotonic() < wait_until:
        time.sleep(0.05)


def test_job_ended_hooks_get_the_state_each_outcome_wrote(sqlite_url, echo_worker):
    # (what the task events of workers.events report as succeeded or failed)
    ok, broken = _queued_job(sqlite_url), _queued_job(sqlite_url, tenant_name="b")
    ended: dict[str, str] = {}

    class Breaks:
        def before_job(self, job) -> None:
            if job.id == broken:
                raise RuntimeError("broken hook")

        def job_ended(self, job, status: str) -> None:
            ended[job.id] = status

    echo_worker.middleware.append(Breaks())

    _deliver_and_settle(echo_worker, [ok, broken])
    assert ended == {ok: "succeeded", broken: "failed"}


def test_logprobs_are_stored_as_each_tokens_text_logprob_and_top_alternatives():
    from engine.outputs import CompletionOutput, RequestOutput
    from workers.job_writes import result_values

    # given the engine's entries: the token first, then its top 2 (itself among them or not)
    completion = CompletionOutput(
        text=" Paris.", token_ids=[7, 9], finish_reason="stop",
        logprobs=[{7: -0.1, 3: -2.5}, {9: -3.0, 4: -0.2, 5: -1.0}],
        token_texts={7: " Paris", 3: " Lyon", 9: ".", 4: "!", 5: "?"})
    output = RequestOutput("job", [1, 2], [completion])

    # when its outcome is written with 2 alternatives asked, and with none asked
    asked, not_asked = result_values(output, 2), result_values(output)

    # then each token is stored with its logprob and the most likely alternatives, in order
    assert asked["output_logprobs"] == [
        [" Paris", -0.1, [[" Paris", -0.1], [" Lyon", -2.5]]],
        [".", -3.0, [["!", -0.2], ["?", -1.0]]]]
    assert "output_logprobs" not in not_asked


def test_a_short_jobs_start_mark_costs_no_statement_and_a_long_jobs_is_written(
        sqlite_url, echo_worker, monkeypatch):
    import workers.worker

    monkeypatch.setattr(workers.worker, "START_MARK_WAIT_SECONDS", 1.0)
    short = _queued_job(sqlite_url)
    statements: list[str] = []

    def record(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement)

    engine = db.get_engine(sqlite_url)
    event.listen(engine, "before_cursor_execute", record)
    try:
        # when a job ends before its start mark was written, then the mark writes nothing
        echo_worker.run(short)
        time.sleep(1.5)
        assert not any(s.startswith("UPDATE jobs SET is_starting") for s in statements)

        # and the mark of a job still running is written once its wait is over
        long = _queued_job(sqlite_url, tenant_name="long")
        echo_worker.engine.stop(timeout=5)
        echo_worker.deliver([Delivery(long, "tag")])
        time.sleep(0.3)
        assert _job(sqlite_url, long).is_starting
        time.sleep(1.2)
        assert not _job(sqlite_url, long).is_starting
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert _job(sqlite_url, short).status == JobStatus.SUCCEEDED
