"""A job's webhook through the whole system: HTTP API → broker → `genq worker` (tiny model) →
state change + event in one transaction → `genq webhook-worker` → a real receiver."""

from __future__ import annotations

import sys

import requests

from producer.client import GenqClient
from tests.e2e.conftest import redis_db
from tests.processes import wait_for
from tests.webhook_receiver import receiving

WEBHOOK_E2E_REDIS_DB = 14


def test_a_finished_job_calls_its_webhook_signed(stack_factory, sqlite_url, redis_url,
                                                 monkeypatch):
    monkeypatch.setenv("GENQ_WEBHOOK_ALLOW_PRIVATE", "true")  # the receiver is on 127.0.0.1
    monkeypatch.setenv("GENQ_WEBHOOK_POLL_SECONDS", "0.2")
    # Its own Redis database: other e2e runs on this broker flush theirs (13) at start.
    stack = stack_factory(sqlite_url, redis_db(redis_url, WEBHOOK_E2E_REDIS_DB))
    webhooks = stack.group.start("webhook-worker", [sys.executable, "-m", "cli",
                                                    "webhook-worker", "--concurrency", "4"])
    wait_for(lambda: " ready." in webhooks.log(), 60, "the webhook worker", webhooks)
    auth = {"Authorization": f"Bearer {stack.key}"}
    secret = requests.post(f"{stack.api_url}/v1/webhook-secret", headers=auth,
                           timeout=10).json()["secret"]

    with receiving() as receiver:
        job = GenqClient(stack.api_url, stack.key, timeout=30).submit(
            prompt="Once upon a time", max_tokens=8, temperature=0,
            webhook_url=receiver.url, webhook_events=["running", "succeeded"])
        wait_for(lambda: len(receiver.requests) == 2, 60, "both webhooks", webhooks)

        # Deliveries run concurrently: arrival order is not promised (payload timestamps are).
        running, succeeded = sorted(receiver.verified(secret), key=lambda p: p["type"])
    assert (running["type"], succeeded["type"]) == ("job.running", "job.succeeded")
    assert succeeded["data"]["id"] == job["id"]
    assert succeeded["data"]["status"] == "succeeded"
    assert succeeded["data"]["usage"]["completion_tokens"] == 8
    log = requests.get(f"{stack.api_url}/v1/jobs/{job['id']}/deliveries", headers=auth,
                       timeout=10).json()["data"]
    assert [d["status"] for d in log] == ["delivered", "delivered"]
