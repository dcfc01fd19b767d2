"""Webhook delivery by a real `genq webhook-worker` process (Celery, real Redis) to real HTTP
receivers on 127.0.0.1: signatures, retries, Retry-After, 410, a hanging receiver, replays.

Events come from real state transitions made here; the API runs in-process (test client)."""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from genq import db
from genq.job_store import transition
from genq.settings import Settings
from genq.states import JobStatus
from producer.submit import load_tokenizer_cached
from results_api.app import create_app
from tests.conftest import MODEL_CACHE_DIR, TINY_MODEL, free_port, make_key
from tests.processes import ProcessGroup, wait_for
from tests.webhook_receiver import Reply, receiving, webhook_test_broker_url

pytestmark = pytest.mark.integration

RETRY_GAP = 0.5
WORKER_ENV = {
    "GENQ_WEBHOOK_ALLOW_PRIVATE": "true",
    # Retries for ~10 s: the receiver-down test starts its receiver after the first failed
    # attempt, and on a loaded 2-core CI machine that once took longer than 5 retries (2.5 s).
    "GENQ_WEBHOOK_RETRY_SCHEDULE": ",".join(["0"] + [str(RETRY_GAP)] * 20),
    "GENQ_WEBHOOK_RETRY_JITTER": "0",
    "GENQ_WEBHOOK_TIMEOUT_SECONDS": "5",
    "GENQ_WEBHOOK_POLL_SECONDS": "0.1",
    "GENQ_WEBHOOK_CONCURRENCY": "8",
    "GENQ_WEBHOOK_MAX_IN_FLIGHT_PER_URL": "2",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """One SQLite database and one webhook worker for the module; a tenant per test."""
    broker_url = webhook_test_broker_url()
    tmp = tmp_path_factory.mktemp("webhooks")
    database_url = f"sqlite:///{tmp / 'genq.db'}"
    db.upgrade(database_url)
    redis.Redis.from_url(broker_url).flushdb()
    load_tokenizer_cached(TINY_MODEL, Path(MODEL_CACHE_DIR))
    settings = Settings(database_url=database_url, broker_url=broker_url,
                        model=TINY_MODEL, model_cache_dir=Path(MODEL_CACHE_DIR),
                        webhook_allow_private=True)
    group = ProcessGroup(tmp, {**os.environ, "GENQ_DATABASE_URL": database_url,
                               "GENQ_BROKER_URL": broker_url, "PYTHONUNBUFFERED": "1",
                               **WORKER_ENV})
    worker = group.start("webhook-worker", [
        sys.executable, "-m", "cli", "webhook-worker",
        "--hostname", f"webhooks-test-{uuid.uuid4().hex[:6]}@%h",
    ])
    wait_for(lambda: " ready." in worker.log(), 60, "the webhook worker", worker)
    yield settings, create_app({"GENQ_SETTINGS": settings}).test_client(), worker
    group.stop_all()
    print(group.logs())  # shown by pytest only when something in the module failed
    redis.Redis.from_url(broker_url).flushdb()


class Tenant:
    """A fresh tenant with an API client; its jobs move through states on demand."""

    def __init__(self, stack) -> None:
        self.settings, self.client, self.worker = stack
        self.auth = {"Authorization":
                     f"Bearer {make_key(self.settings.database_url, uuid.uuid4().hex)}"}

    def post(self, path: str, body: dict | None = None) -> dict:
        response = self.client.post(path, json=body, headers=self.auth)
        assert response.status_code < 300, response.json
        return response.json

    def get(self, path: str) -> dict:
        response = self.client.get(path, headers=self.auth)
        assert response.status_code == 200, response.json
        return response.json

    def job_secret(self) -> str:
        return self.post("/v1/webhook-secret")["secret"]

    def endpoint(self, url: str, events: list[str] | None = None) -> dict:
        return self.post("/v1/webhook-endpoints", {"url": url, "events": events})

    def job(self, **fields) -> str:
        return self.post("/v1/jobs", {"prompt": "Hi", "max_tokens": 2, **fields})["id"]

    def move(self, job_id: str, *states: JobStatus) -> None:
        for state in states:
            with db.transaction(self.settings.database_url) as session:
                assert transition(session, job_id, state)

    def deliveries(self, job_id: str) -> list[dict]:
        return self.get(f"/v1/jobs/{job_id}/deliveries")["data"]

    def settled(self, job_id: str, count: int = 1) -> list[dict]:
        """Wait until the job has `count` deliveries, none pending; return them."""
        def done() -> bool:
            deliveries = self.deliveries(job_id)
            return len(deliveries) == count and all(d["status"] != "pending"
                                                    for d in deliveries)
        wait_for(done, 45, f"{count} settled deliveries of {job_id}")
        return self.deliveries(job_id)


@pytest.fixture
def tenant(stack) -> Tenant:
    return Tenant(stack)


def test_every_delivery_is_signed_and_verified_by_the_official_package(tenant):
    job_secret = tenant.job_secret()
    with receiving() as job_receiver, receiving() as endpoint_receiver:
        endpoint = tenant.endpoint(endpoint_receiver.url, ["running", "succeeded"])
        job_id = tenant.job(webhook_url=job_receiver.url, webhook_events=["running",
                                                                          "succeeded"])

        tenant.move(job_id, JobStatus.RUNNING, JobStatus.SUCCEEDED)
        deliveries = tenant.settled(job_id, count=4)

        assert {d["status"] for d in deliveries} == {"delivered"}
        for receiver, secret in ((job_receiver, job_secret),
                                 (endpoint_receiver, endpoint["secret"])):
            payloads = sorted(receiver.verified(secret), key=lambda p: p["type"])
            assert [p["type"] for p in payloads] == ["job.running", "job.succeeded"]
            assert [p["data"]["status"] for p in payloads] == ["running", "succeeded"]
            assert {p["data"]["id"] for p in payloads} == {job_id}


def test_two_500s_then_200_is_delivered_once_more_with_the_same_id(tenant):
    secret = tenant.job_secret()
    with receiving([Reply(500), Reply(500), Reply(200)]) as receiver:
        job_id = tenant.job(webhook_url=receiver.url)
        tenant.move(job_id, JobStatus.FAILED)

        [delivery] = tenant.settled(job_id)
        time.sleep(3 * RETRY_GAP)  # no further attempt after the 200

        assert delivery["status"] == "delivered"
        assert [a["status_code"] for a in delivery["attempts"]] == [500, 500, 200]
        assert len(receiver.requests) == 3
        assert {r.headers["webhook-id"] for r in receiver.requests} == {delivery["event_id"]}
        assert len(receiver.verified(secret)) == 3


def test_a_receiver_that_is_down_gets_the_event_once_it_is_up(tenant):
    secret = tenant.job_secret()
    port = free_port()
    job_id = tenant.job(webhook_url=f"http://127.0.0.1:{port}/hook")
    tenant.move(job_id, JobStatus.FAILED)
    wait_for(lambda: tenant.deliveries(job_id)[0]["attempts"], 10, "a first failed attempt")

    with receiving(port=port) as receiver:
        [delivery] = tenant.settled(job_id)

        assert delivery["status"] == "delivered"
        assert delivery["attempts"][0]["status_code"] is None
        assert "Connection refused" in delivery["attempts"][0]["error"]
        assert receiver.verified(secret)[0]["type"] == "job.failed"


def test_410_gone_disables_the_endpoint(tenant):
    with receiving([Reply(410)]) as receiver:
        endpoint = tenant.endpoint(receiver.url)
        first = tenant.job()
        tenant.move(first, JobStatus.FAILED)

        [delivery] = tenant.settled(first)
        second = tenant.job()
        tenant.move(second, JobStatus.FAILED)

        assert delivery["status"] == "failed" and len(delivery["attempts"]) == 1
        state = tenant.get(f"/v1/webhook-endpoints/{endpoint['id']}")
        assert state["enabled"] is False and "410" in state["disabled_reason"]
        assert tenant.deliveries(second) == []  # a disabled endpoint gets no new events
        assert len(receiver.requests) == 1


def test_429_with_retry_after_is_honored(tenant):
    tenant.job_secret()
    with receiving([Reply(429, {"Retry-After": "2"}), Reply(200)]) as receiver:
        job_id = tenant.job(webhook_url=receiver.url)
        tenant.move(job_id, JobStatus.FAILED)

        [delivery] = tenant.settled(job_id)

        assert [a["status_code"] for a in delivery["attempts"]] == [429, 200]
        gap = receiver.requests[1].at - receiver.requests[0].at
        assert 1.9 <= gap < 5, gap  # the schedule alone would have retried after 0.5 s


def test_a_hanging_receiver_does_not_delay_deliveries_to_others(tenant):
    with receiving([Reply(hang_seconds=30)]) as hanging, receiving() as healthy:
        stuck = tenant.endpoint(hanging.url)
        tenant.endpoint(healthy.url)
        jobs = [tenant.job() for _ in range(3)]

        for job_id in jobs:
            tenant.move(job_id, JobStatus.FAILED)
        wait_for(lambda: len(healthy.requests) == 3, 10, "the healthy receiver's events")

        # Measured from the first call to the hanging receiver, not from the transitions (on a
        # loaded CI machine they alone once took most of 4 s): had a healthy delivery queued
        # behind a hanging one, it would have arrived only after that call's 5 s timeout.
        wait_for(lambda: hanging.requests, 10, "a call to the hanging receiver")
        first_hang = hanging.requests[0].at
        timeout = float(WORKER_ENV["GENQ_WEBHOOK_TIMEOUT_SECONDS"])
        assert healthy.requests[-1].at - first_hang < timeout - 1.0
        tenant.client.patch(f"/v1/webhook-endpoints/{stuck['id']}", json={"enabled": False},
                            headers=tenant.auth)


def test_a_slow_receiver_holds_at_most_its_share_of_the_webhook_threads(tenant):
    # given a receiver that takes 3 s per answer and 6 events for it
    hang = 3.0
    with receiving([Reply(hang_seconds=hang)]) as slow:
        endpoint = tenant.endpoint(slow.url)
        for job_id in [tenant.job() for _ in range(6)]:
            tenant.move(job_id, JobStatus.FAILED)

        # when it has been called 3 times (the third once an earlier call answered)
        wait_for(lambda: len(slow.requests) >= 3, 20, "three calls to the slow receiver")
        tenant.client.patch(f"/v1/webhook-endpoints/{endpoint['id']}",
                            json={"enabled": False}, headers=tenant.auth)

    # then at no moment were more than 2 (the per-URL cap) of the 8 threads calling it.
    # Counted from the calls' own start times: a fixed sleep once saw a third call begin as
    # the first answered, on a loaded CI machine.
    starts = [request.at for request in slow.requests]
    in_flight = max(sum(1 for other in starts if other <= start < other + hang - 0.1)
                    for start in starts)
    assert in_flight == 2, starts


def test_replay_sends_the_same_event_again_with_the_same_id(tenant):
    secret = tenant.job_secret()
    with receiving() as receiver:
        job_id = tenant.job(webhook_url=receiver.url)
        tenant.move(job_id, JobStatus.FAILED)
        [original] = tenant.settled(job_id)

        replay = tenant.post(f"/v1/deliveries/{original['id']}/replay")
        tenant.settled(job_id, count=2)

        first, second = receiver.requests
        assert replay["event_id"] == original["event_id"]
        assert first.headers["webhook-id"] == second.headers["webhook-id"] == original["event_id"]
        assert first.body == second.body
        assert len(receiver.verified(secret)) == 2


def test_after_a_rotation_deliveries_verify_with_the_old_and_the_new_secret(tenant):
    with receiving() as receiver:
        endpoint = tenant.endpoint(receiver.url)
        rotated = tenant.post(f"/v1/webhook-endpoints/{endpoint['id']}/rotate-secret")
        job_id = tenant.job()
        tenant.move(job_id, JobStatus.FAILED)
        tenant.settled(job_id)

        assert receiver.requests[0].headers["webhook-signature"].count("v1,") == 2
        for secret in (endpoint["secret"], rotated["secret"]):
            assert receiver.verified(secret)[0]["type"] == "job.failed"


def test_delivered_events_log_no_info_lines(tenant):
    with receiving() as receiver:
        tenant.endpoint(receiver.url)
        for job_id in [tenant.job() for _ in range(3)]:
            tenant.move(job_id, JobStatus.FAILED)
        wait_for(lambda: len(receiver.requests) == 3, 10, "the events")
        time.sleep(0.5)
    delivery_lines = [line for line in tenant.worker.log().splitlines()
                      if "deliver_webhook[" in line or "webhook dlv_" in line]
    assert delivery_lines == []
