"""Per-job deadlines (`timeout_s`): a job still running at its deadline is stopped and
`expired`, and keeps the output it had generated so far."""

from __future__ import annotations

from producer.client import GenqClient
from tests.chaos.conftest import worker_env

MAX_TOKENS = 1900
# Random weights in SmolLM2's shapes: 1900 tokens take well past the 2 s deadline on any CPU
# (about 20 s at 10 ms a token). The tiny model ran them all in under 2 s on a fast one.
SLOW_MODEL = "dummy:smollm2-135m"


def test_job_deadline_expires_with_partial_output(redis_broker, sqlite_url, stack_factory):
    # Given a worker
    stack = stack_factory(sqlite_url, redis_broker.url, model=SLOW_MODEL, name="worker-1",
                          concurrency=4, env=worker_env())
    client = GenqClient(stack.api_url, stack.key)

    # When a long job with a 2 s deadline runs
    job = client.submit(prompt="Count forever:", max_tokens=MAX_TOKENS, temperature=0,
                        timeout_s=2)
    done = client.wait(job["id"], timeout=60, poll=0.2)

    # Then it is expired at its deadline, with the partial output kept
    assert done["status"] == "expired", done
    assert done["output"]["text"], done
    assert 0 < done["usage"]["completion_tokens"] < MAX_TOKENS, done
    assert done["finished_at"] - done["created_at"] <= 2 + 3, done
