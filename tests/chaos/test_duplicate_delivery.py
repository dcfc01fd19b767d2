"""At-least-once from the broker, exactly one result from the DB: a job's message delivered
more than once (a redelivery, a republish by the relay) runs the job once."""

from __future__ import annotations

from genq.queues import queue_for
from genq.states import Priority
from producer.client import GenqClient
from producer.publisher import publish_job
from tests.chaos.conftest import jobs_by_id, worker_env
from tests.conftest import TINY_MODEL


def _publish_duplicate(broker_url: str, job_id: str) -> None:
    publish_job(broker_url, job_id, queue_for(TINY_MODEL, Priority.DEFAULT))


def _wait_behind(client: GenqClient) -> None:
    """Submit a job after the duplicates and wait for it: the worker has taken everything
    published before it off the queue, and a no-op takes far less than this job's 64 tokens."""
    sentinel = client.submit(prompt="Sentinel", max_tokens=64, temperature=0)
    assert client.wait(sentinel["id"], timeout=60, poll=0.2)["status"] == "succeeded"


def test_duplicate_delivery_writes_one_result(broker, sqlite_url, stack_factory):
    # Given a job whose message is in the broker three times: the API's publish + 2 duplicates
    stack = stack_factory(sqlite_url, broker.url, worker=False)
    client = GenqClient(stack.api_url, stack.key)
    job_id = client.submit(prompt="Once upon a time", max_tokens=32, temperature=0)["id"]
    _publish_duplicate(broker.url, job_id)
    _publish_duplicate(broker.url, job_id)

    # When a worker with room for all three deliveries at once consumes them
    stack.start_worker(name="worker-1", concurrency=4, env=worker_env())
    done = client.wait(job_id, timeout=60, poll=0.2)
    _wait_behind(client)

    # Then the job ran once and has one result
    first = jobs_by_id(sqlite_url)[job_id]
    assert done["status"] == "succeeded"
    assert (first.attempts, first.completion_tokens) == (1, 32)

    # And a duplicate delivered after it finished is a no-op too
    _publish_duplicate(broker.url, job_id)
    _wait_behind(client)
    again = jobs_by_id(sqlite_url)[job_id]
    assert (again.status, again.attempts, again.output_text, again.finished_at,
            again.worker_id) == (first.status, 1, first.output_text, first.finished_at,
                                 first.worker_id)
