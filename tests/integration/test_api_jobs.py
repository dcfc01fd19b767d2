"""The jobs API through Flask's test client, on real SQLite and PostgreSQL and a real Redis."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import kombu
import kombu.exceptions
import pytest
from sqlalchemy import func, select

from genq import db
from genq.job_store import transition
from genq.models import Job, Outbox, utcnow
from genq.queues import AMQP_MAX_PRIORITY, job_queues, queue_for, route
from genq.settings import Settings
from genq.states import JobStatus, Priority
from producer.outbox import relay_pending
from producer.publisher import publish_job
from producer.submit import load_tokenizer_cached
from results_api.app import create_app
from tests.conftest import (
    MODEL_CACHE_DIR,
    TINY_MODEL,
    empty_redis_db,
    free_port,
    make_key,
    redis_queue_messages,
)

pytestmark = pytest.mark.integration

TEST_REDIS_DB = 11  # keeps our unconsumed messages away from workers of other test runs
DEFAULT_QUEUE = queue_for(TINY_MODEL, Priority.DEFAULT)


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    """The tests' shared tokenizer cache, loaded before any test times a request."""
    cache_dir = Path(MODEL_CACHE_DIR)
    load_tokenizer_cached(TINY_MODEL, cache_dir)
    return cache_dir


@pytest.fixture
def broker_url(redis_url) -> Iterator[str]:
    yield from empty_redis_db(redis_url, TEST_REDIS_DB)


def make_settings(database_url: str, broker_url: str, model_cache_dir, **overrides) -> Settings:
    return Settings(database_url=database_url, broker_url=broker_url, model=TINY_MODEL,
                    model_cache_dir=model_cache_dir, **overrides)


@pytest.fixture
def settings(database_url, broker_url, model_cache_dir) -> Settings:
    return make_settings(database_url, broker_url, model_cache_dir, max_model_len=64,
                         outbox_stale_seconds=0.01)


@pytest.fixture
def client(settings):
    return create_app({"GENQ_SETTINGS": settings}).test_client()


@pytest.fixture
def auth(settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key(settings.database_url, 'acme')}"}


def submit(client, auth, body=None, **headers):
    return client.post("/v1/jobs", json=body or {"prompt": "Hello", "max_tokens": 4},
                       headers=auth | headers)


def job_rows(settings) -> int:
    with db.session_factory(settings.database_url)() as session:
        return session.scalar(select(func.count()).select_from(Job))


def finish_job(settings, job_id: str, text: str = "Paris") -> None:
    with db.transaction(settings.database_url) as session:
        assert transition(session, job_id, JobStatus.RUNNING, only_from={JobStatus.QUEUED},
                          started_at=utcnow())
    with db.transaction(settings.database_url) as session:
        assert transition(session, job_id, JobStatus.SUCCEEDED, output_text=text,
                          finish_reason="stop", prompt_tokens=3, completion_tokens=1)


def assert_error(response, status: int, code: str, param: str | None = None) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    error = response.get_json()["error"]
    assert error["code"] == code
    assert error["message"]
    if param is not None:
        assert error["param"] == param


# --- submit and read ---------------------------------------------------------------------


def test_submit_queues_a_job_and_publishes_it(client, auth, settings, broker_url):
    response = submit(client, auth, {"messages": [{"role": "user", "content": "Hi"}],
                                     "max_tokens": 4, "metadata": {"run": "1"}})

    assert response.status_code == 202
    job = response.get_json()
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["object"] == "job" and job["status"] == "queued" and job["model"] == TINY_MODEL
    assert job["output"] is None and job["usage"] is None and job["error"] is None
    assert job["metadata"] == {"run": "1"} and isinstance(job["created_at"], int)
    with db.session_factory(settings.database_url)() as session:
        row = session.get(Job, job["id"])
    assert set(row.sampling_params) == {"max_tokens", "temperature", "top_p", "top_k", "seed",
                                        "stop"}
    # The outbox row is marked sent off the request path, within sent_marks.FLUSH_SECONDS.
    outbox = _outbox_row_once_marked(settings.database_url, job["id"])
    assert outbox.sent_at is not None and outbox.queue == DEFAULT_QUEUE
    messages = redis_queue_messages(broker_url, DEFAULT_QUEUE)
    assert len(messages) == 1 and job["id"].encode() in messages[0]


def _outbox_row_once_marked(database_url: str, job_id: str, timeout: float = 5) -> Outbox:
    deadline = time.monotonic() + timeout
    while True:
        with db.session_factory(database_url)() as session:
            outbox = session.scalar(select(Outbox).where(Outbox.job_id == job_id))
        if outbox.sent_at is not None or time.monotonic() > deadline:
            return outbox
        time.sleep(0.02)


def test_get_returns_the_finished_job_with_output_and_usage(client, auth, settings):
    job_id = submit(client, auth).get_json()["id"]
    finish_job(settings, job_id)

    job = client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()

    assert job["status"] == "succeeded"
    assert job["output"] == {"text": "Paris", "finish_reason": "stop", "logprobs": None}
    assert job["usage"] == {"prompt_tokens": 3, "completion_tokens": 1}
    assert job["started_at"] is not None and job["finished_at"] >= job["created_at"]


# --- errors -----------------------------------------------------------------------------


def test_bad_json_is_400(client, auth):
    response = client.post("/v1/jobs", data="{not json", content_type="application/json",
                            headers=auth)
    assert_error(response, 400, "invalid_json")


def test_missing_key_is_401(client):
    assert_error(client.post("/v1/jobs", json={"prompt": "x"}), 401, "unauthorized")


def test_unknown_key_is_401(client):
    response = client.get("/v1/jobs", headers={"Authorization": "Bearer gq_nope"})
    assert_error(response, 401, "unauthorized")


@pytest.mark.parametrize("job_id", ["job_missing", "job_%00missing"])  # %00: NUL, no 500
def test_unknown_job_id_is_404(client, auth, job_id):
    assert_error(client.get(f"/v1/jobs/{job_id}", headers=auth), 404, "not_found", "id")
    assert_error(client.post(f"/v1/jobs/{job_id}/cancel", headers=auth), 404, "not_found", "id")


def test_other_tenants_job_is_404(client, auth, settings):
    job_id = submit(client, auth).get_json()["id"]
    other = {"Authorization": f"Bearer {make_key(settings.database_url, 'globex')}"}

    assert_error(client.get(f"/v1/jobs/{job_id}", headers=other), 404, "not_found")
    assert_error(client.post(f"/v1/jobs/{job_id}/cancel", headers=other), 404, "not_found")
    assert client.get("/v1/jobs", headers=other).get_json()["data"] == []


def test_unknown_route_and_wrong_method_are_json(client, auth):
    assert_error(client.get("/v2/nothing", headers=auth), 404, "not_found")
    assert_error(client.delete("/v1/jobs", headers=auth), 405, "method_not_allowed")


def test_body_over_the_limit_is_413(client, auth, settings):
    body = {"prompt": "x" * settings.max_body_bytes}
    assert_error(submit(client, auth, body), 413, "payload_too_large")
    assert job_rows(settings) == 0


def test_wrong_content_type_is_415(client, auth):
    response = client.post("/v1/jobs", data="prompt=x", headers=auth,
                           content_type="application/x-www-form-urlencoded")
    assert_error(response, 415, "unsupported_media_type")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "colour": "red"}, "colour"),
        ({"prompt": "x", "temperature": 3}, "temperature"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "messages"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "x", "model": "gpt-5"}, "model"),
        # NUL cannot be stored in a PostgreSQL text column: refused alike on every database.
        ({"prompt": "a\x00b"}, "prompt"),
        ({"prompt": "x", "webhook_url": "https://example.com/\x00"}, "webhook_url"),
    ],
)
def test_invalid_values_are_422_with_param(client, auth, settings, body, param):
    assert_error(submit(client, auth, body), 422, "invalid_request", param)
    assert job_rows(settings) == 0


def test_explicit_nulls_are_the_defaults(client, auth, settings):
    nulls = {"prompt": "x", "max_tokens": 4, "stop": None, "seed": None, "model": None,
             "timeout_s": None, "webhook_url": None, "webhook_events": None}

    assert submit(client, auth, nulls).status_code == 202
    bulk = client.post("/v1/jobs/bulk", json={"jobs": [nulls, nulls]}, headers=auth)
    assert bulk.status_code == 202, bulk.get_data(as_text=True)
    assert job_rows(settings) == 3


def test_prompt_longer_than_the_context_is_422(client, auth, settings):
    response = submit(client, auth, {"prompt": "word " * 100, "max_tokens": 8})
    assert_error(response, 422, "context_length_exceeded", "prompt")

    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}
    assert_error(submit(client, auth, chat), 422, "context_length_exceeded", "messages")


def test_bad_list_arguments_are_422(client, auth):
    assert_error(client.get("/v1/jobs?status=done", headers=auth), 422, "invalid_request",
                 "status")
    assert_error(client.get("/v1/jobs?limit=101", headers=auth), 422, "invalid_request", "limit")
    # Digits only, ASCII only: int() took " 5" and "٣" (results_api.context.limit_arg).
    for limit in ("x", "-1", "%205", "٣", "²"):
        assert_error(client.get(f"/v1/jobs?limit={limit}", headers=auth), 422,
                     "invalid_request", "limit")
    assert_error(client.get("/v1/jobs?after=job_%00", headers=auth), 422, "invalid_request",
                 "after")


@pytest.mark.parametrize("prefer", ["wait=61", "wait=-1", "wait=soon", "wait=²"])
def test_bad_prefer_wait_is_422(client, auth, prefer):
    assert_error(submit(client, auth, Prefer=prefer), 422, "invalid_request", "Prefer")


def test_unreachable_database_is_503(client, auth):
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    client.application.config["GENQ_SETTINGS"] = Settings(database_url=closed, model=TINY_MODEL)

    assert_error(client.get("/v1/jobs", headers=auth), 503, "service_unavailable")
    assert_error(submit(client, auth), 503, "service_unavailable")


# --- idempotency ------------------------------------------------------------------------


def test_same_idempotency_key_and_body_returns_the_same_job(client, auth, settings):
    first = submit(client, auth, **{"Idempotency-Key": "k1"})
    replay = submit(client, auth, **{"Idempotency-Key": "k1"})

    assert (first.status_code, replay.status_code) == (202, 200)
    assert replay.get_json()["id"] == first.get_json()["id"]
    assert job_rows(settings) == 1


def test_same_idempotency_key_with_another_body_is_422(client, auth, settings):
    submit(client, auth, **{"Idempotency-Key": "k1"})
    response = submit(client, auth, {"prompt": "Other"}, **{"Idempotency-Key": "k1"})

    assert_error(response, 422, "idempotency_key_reused", "Idempotency-Key")
    assert job_rows(settings) == 1


def test_twenty_concurrent_identical_submits_make_one_job(client, auth, settings):
    app, barrier, responses = client.application, threading.Barrier(20), []

    def post() -> None:
        own_client = app.test_client()
        barrier.wait()
        responses.append(submit(own_client, auth, **{"Idempotency-Key": "same"}))

    threads = [threading.Thread(target=post) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(r.status_code for r in responses) == [200] * 19 + [202]
    assert len({r.get_json()["id"] for r in responses}) == 1
    assert job_rows(settings) == 1


# --- broker down and the outbox relay ---------------------------------------------------


def test_submit_with_the_broker_down_keeps_the_job_and_the_relay_publishes_it(
    database_url, broker_url, model_cache_dir
):
    down = make_settings(database_url, f"redis://127.0.0.1:{free_port()}/0", model_cache_dir)
    client = create_app({"GENQ_SETTINGS": down}).test_client()
    auth = {"Authorization": f"Bearer {make_key(database_url)}"}

    started = time.monotonic()
    response = submit(client, auth)
    assert response.status_code == 202
    assert time.monotonic() - started < 3
    job_id = response.get_json()["id"]
    with db.session_factory(database_url)() as session:
        outbox = session.scalar(select(Outbox).where(Outbox.job_id == job_id))
    assert outbox.sent_at is None and outbox.publish_attempts == 1

    up = make_settings(database_url, broker_url, model_cache_dir, outbox_stale_seconds=0.01)
    time.sleep(0.05)
    assert relay_pending(up) == 1
    assert relay_pending(up) == 0

    with db.session_factory(database_url)() as session:
        assert session.get(Outbox, outbox.id).sent_at is not None
    messages = redis_queue_messages(broker_url, DEFAULT_QUEUE)
    assert len(messages) == 1 and job_id.encode() in messages[0]


def test_relay_leaves_fresh_rows_to_the_submitting_process(
    database_url, broker_url, model_cache_dir
):
    down = make_settings(database_url, f"redis://127.0.0.1:{free_port()}/0", model_cache_dir)
    submit(create_app({"GENQ_SETTINGS": down}).test_client(),
           {"Authorization": f"Bearer {make_key(database_url)}"})

    up = make_settings(database_url, broker_url, model_cache_dir, outbox_stale_seconds=60)
    assert relay_pending(up) == 0


def test_publisher_delivers_to_the_rabbitmq_priority_queue(rabbitmq_url):
    job_id = f"job_probe_{uuid.uuid4().hex[:8]}"
    publish_job(rabbitmq_url, job_id, queue_for(TINY_MODEL, Priority.INTERACTIVE))

    with kombu.Connection(rabbitmq_url) as connection:
        queue = job_queues(rabbitmq_url, TINY_MODEL)[0](connection.channel())
        assert queue.queue_arguments == {"x-max-priority": AMQP_MAX_PRIORITY}
        for _ in range(10_000):
            message = queue.get(no_ack=True)
            assert message is not None, "the published message never arrived"
            if message.headers.get("argsrepr") == repr([job_id]):
                break
        assert message.properties["priority"] == route(
            queue_for(TINY_MODEL, Priority.INTERACTIVE), rabbitmq_url)[1]


@pytest.mark.parametrize("broker", ["redis://127.0.0.1:{port}/0",
                                    "amqp://guest:guest@127.0.0.1:{port}//"])
def test_publisher_fails_fast_when_the_broker_is_down(broker):
    started = time.monotonic()
    with pytest.raises(kombu.exceptions.OperationalError):
        publish_job(broker.format(port=free_port()), "job_probe", DEFAULT_QUEUE)
    assert time.monotonic() - started < 2.5


# --- cancel -----------------------------------------------------------------------------


def test_cancel_of_a_queued_job_cancels_it_at_once(client, auth):
    job_id = submit(client, auth).get_json()["id"]

    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)

    assert response.status_code == 200
    assert response.get_json()["status"] == "canceled"
    assert response.get_json()["finished_at"] is not None


def test_cancel_of_a_running_job_marks_it_canceled(client, auth, settings):
    job_id = submit(client, auth).get_json()["id"]
    with db.transaction(settings.database_url) as session:
        transition(session, job_id, JobStatus.RUNNING, only_from={JobStatus.QUEUED})

    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth).get_json()["status"] == (
        "canceled")


def test_cancel_of_a_finished_job_is_409(client, auth, settings):
    job_id = submit(client, auth).get_json()["id"]
    finish_job(settings, job_id)

    assert_error(client.post(f"/v1/jobs/{job_id}/cancel", headers=auth), 409, "conflict")
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()["status"] == "succeeded"


# --- list -------------------------------------------------------------------------------


def test_list_pages_newest_first_with_a_cursor(client, auth):
    ids = [submit(client, auth).get_json()["id"] for _ in range(5)]

    first = client.get("/v1/jobs?limit=2", headers=auth).get_json()
    second = client.get(f"/v1/jobs?limit=2&after={first['last_id']}", headers=auth).get_json()
    third = client.get(f"/v1/jobs?limit=2&after={second['last_id']}", headers=auth).get_json()

    assert first["object"] == "list"
    pages = [[job["id"] for job in page["data"]] for page in (first, second, third)]
    assert pages == [ids[::-1][0:2], ids[::-1][2:4], ids[::-1][4:]]
    assert [page["has_more"] for page in (first, second, third)] == [True, True, False]


def test_list_filters_by_status(client, auth):
    queued, canceled = (submit(client, auth).get_json()["id"] for _ in range(2))
    client.post(f"/v1/jobs/{canceled}/cancel", headers=auth)

    data = client.get("/v1/jobs?status=queued", headers=auth).get_json()["data"]

    assert [job["id"] for job in data] == [queued]


# --- Prefer: wait -----------------------------------------------------------------------


def test_prefer_wait_on_a_job_nobody_runs_answers_202_after_the_wait(client, auth):
    started = time.monotonic()
    response = submit(client, auth, Prefer="wait=1")

    assert response.status_code == 202
    assert response.get_json()["status"] == "queued"
    assert 1 <= time.monotonic() - started < 3


def test_prefer_wait_returns_the_job_finished_meanwhile(client, auth, settings):
    def finish_when_queued() -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with db.session_factory(settings.database_url)() as session:
                job_id = session.scalar(select(Job.id).where(Job.status == "queued"))
            if job_id:
                finish_job(settings, job_id, text="Paris.")
                return
            time.sleep(0.05)

    worker = threading.Thread(target=finish_when_queued)
    worker.start()
    response = submit(client, auth, Prefer="wait=5")
    worker.join()

    assert response.status_code == 200
    assert response.headers["Preference-Applied"] == "wait=5"
    assert response.get_json()["output"]["text"] == "Paris."
