"""The broker goes away: submits still answer 202 (the job and its outbox row are committed
first), the outbox relay publishes what could not be published, and every job finishes."""

from __future__ import annotations

import threading
import time

from producer.client import GenqClient
from tests.chaos.conftest import (
    WorkerSupervisor,
    count_by_status,
    outbox_rows,
    wait_until_all_finished,
    worker_env,
)

OUTAGE_SECONDS = 3


def _post_job(client: GenqClient, index: int) -> tuple[int, str | None]:
    response = client.session.post(
        f"{client.base_url}/v1/jobs",
        json={"prompt": f"Line {index}:", "max_tokens": 16, "temperature": 0},
        timeout=30,
    )
    body = response.json() if response.headers.get("content-type", "").startswith(
        "application/json") else {}
    return response.status_code, body.get("id")


def _warm_up(client: GenqClient) -> None:
    """One job end to end: the API and the worker hold live broker connections before the
    outage, so the test also covers their reconnecting."""
    job = client.submit(prompt="Warm up", max_tokens=2, temperature=0)
    assert client.wait(job["id"], timeout=60, poll=0.2)["status"] == "succeeded"


def test_broker_restart_during_submission_loses_no_job(broker, sqlite_url, stack_factory):
    # Given a running stack whose worker is restarted if it dies (as a container restart
    # policy or `genq up` does: Celery/kombu may exit on a broker connection lost mid-ack)
    stack = stack_factory(sqlite_url, broker.url, name="worker-1", concurrency=16,
                          env=worker_env())
    client = GenqClient(stack.api_url, stack.key)
    _warm_up(client)
    supervisor = WorkerSupervisor(stack, worker_env(), concurrency=16)
    supervisor.start()
    answers: list[tuple[int, str | None]] = []

    def restart_broker_mid_submission() -> None:
        while len(answers) < 60:
            time.sleep(0.01)
        broker.stop()
        time.sleep(OUTAGE_SECONDS)
        broker.start()

    restarter = threading.Thread(target=restart_broker_mid_submission, daemon=True)
    restarter.start()

    # When 200 jobs are submitted while the broker restarts
    for index in range(200):
        answers.append(_post_job(client, index))
    restarter.join(timeout=60)

    # Then every job that was accepted finishes
    job_ids = [job_id for status, job_id in answers if status == 202]
    try:
        jobs = wait_until_all_finished(sqlite_url, job_ids, timeout=120,
                                       abort=lambda: supervisor.errors)
    finally:
        supervisor.stop()
    assert count_by_status(sqlite_url, job_ids) == {"succeeded": len(job_ids)}
    assert all(jobs[i].completion_tokens == 16 for i in job_ids)
    # And every submit was accepted
    statuses = [status for status, _ in answers]
    assert statuses == [202] * 200, f"answers other than 202: {_tally(statuses)}"


def _tally(statuses: list[int]) -> dict[int, int]:
    return {status: statuses.count(status) for status in sorted(set(statuses))}


def test_broker_down_at_submit_is_relayed_when_it_returns(broker, sqlite_url, stack_factory):
    # Given a running stack whose broker goes down
    stack = stack_factory(sqlite_url, broker.url, name="worker-1", concurrency=8,
                          env=worker_env())
    client = GenqClient(stack.api_url, stack.key)
    _warm_up(client)
    broker.stop()
    try:
        # When jobs are submitted
        started = time.monotonic()
        answers = [_post_job(client, index) for index in range(10)]
        submit_seconds = time.monotonic() - started
        job_ids = [job_id for _, job_id in answers]

        # Then each is accepted (202, quickly), queued, with its outbox row not yet sent
        statuses = [status for status, _ in answers]
        assert statuses == [202] * 10, f"answers other than 202: {_tally(statuses)}"
        assert submit_seconds < 10 * 5, f"10 submits took {submit_seconds:.1f} s"
        assert count_by_status(sqlite_url, job_ids) == {"queued": 10}
        unsent = {row.job_id for row in outbox_rows(sqlite_url) if row.sent_at is None}
        assert unsent == set(job_ids)
    finally:
        # When the broker returns
        broker.start()

    # Then the relay publishes them and they all succeed
    jobs = wait_until_all_finished(sqlite_url, job_ids, timeout=120)
    assert count_by_status(sqlite_url, job_ids) == {"succeeded": 10}
    assert all(jobs[i].attempts == 1 for i in job_ids)
    assert all(row.sent_at is not None for row in outbox_rows(sqlite_url)
               if row.job_id in job_ids)
