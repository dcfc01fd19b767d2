"""The batch feeder on a real database and a real Redis broker, with no worker: it ingests a
file into job rows, keeps only a window of them on the broker, tops the window up as lines
finish, and finalizes a cancelled batch with every line accounted for."""

from __future__ import annotations

import io
import json

import pytest
import redis
from sqlalchemy import func, select

from genq import db
from genq.job_store import transition
from genq.limits import TenantLimits, set_limits
from genq.models import Job, Outbox
from genq.queues import queue_for
from genq.settings import Settings
from genq.states import JobStatus, Priority
from producer.batch_feeder import feed_batches
from results_api.app import create_app
from tests.conftest import TINY_MODEL, make_key, redis_queue_messages

pytestmark = pytest.mark.integration

FEEDER_REDIS_DB = 8
LINES, WINDOW = 600, 100
BATCH_QUEUE = queue_for(TINY_MODEL, Priority.BATCH)


@pytest.fixture
def broker(redis_url):
    url = redis_url.rsplit("/", 1)[0] + f"/{FEEDER_REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


def count(database_url: str, *where) -> int:
    with db.session_factory(database_url)() as session:
        return session.scalar(select(func.count()).select_from(Job).where(*where))


def _create_batch(api, lines: list[tuple[str, str]]) -> str:
    """Upload a file of /v1/completions lines, (custom_id, prompt) each, and create its batch."""
    content = "".join(json.dumps({
        "custom_id": custom_id, "method": "POST", "url": "/v1/completions",
        "body": {"model": TINY_MODEL, "prompt": prompt, "max_tokens": 3}}) + "\n"
        for custom_id, prompt in lines).encode()
    file_id = api.post("/v1/files", data={"purpose": "batch", "file": (io.BytesIO(content),
                                                                       "f.jsonl")},
                       content_type="multipart/form-data").get_json()["id"]
    return api.post("/v1/batches", json={"input_file_id": file_id,
                                         "endpoint": "/v1/completions"}).get_json()["id"]


def test_feeder_enqueues_in_windows_and_finalizes_a_cancelled_batch(database_url, broker,
                                                                     tmp_path):
    # given a 600-line batch and a window of 100
    broker_url = broker
    settings = Settings(database_url=database_url, broker_url=broker_url, model=TINY_MODEL,
                        data_dir=tmp_path, batch_window_jobs=WINDOW)
    api = create_app({"GENQ_SETTINGS": settings}).test_client()
    api.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {make_key(database_url)}"
    batch_id = _create_batch(api, [(f"c{i}", f"p{i}") for i in range(LINES)])

    # when the feeder runs twice: then every line is a job, one window of them on the broker
    feed_batches(settings)
    feed_batches(settings)
    in_batch = (Job.batch_id == batch_id,)
    assert count(database_url, *in_batch) == LINES
    assert count(database_url, *in_batch, Job.priority == "batch") == LINES
    assert len(redis_queue_messages(broker_url, BATCH_QUEUE)) == WINDOW
    with db.session_factory(database_url)() as session:
        assert session.scalar(select(func.count()).select_from(Outbox)) == WINDOW

    # when 30 lines finish (as a worker would record them), the window is topped up by 30
    with db.session_factory(database_url)() as session:
        first = session.scalars(select(Job.id).where(*in_batch).order_by(Job.batch_line)
                                .limit(30)).all()
    with db.transaction(database_url) as session:
        for job_id in first:
            assert transition(session, job_id, JobStatus.RUNNING, worker_id="w")
            assert transition(session, job_id, JobStatus.SUCCEEDED, output_text="ok",
                              finish_reason="stop", prompt_tokens=2, completion_tokens=1)
    feed_batches(settings)
    assert len(redis_queue_messages(broker_url, BATCH_QUEUE)) == WINDOW + 30

    # when the batch is cancelled: the rest is cancelled, the finished lines are kept
    assert api.post(f"/v1/batches/{batch_id}/cancel").get_json()["status"] == "cancelling"
    feed_batches(settings)
    batch = api.get(f"/v1/batches/{batch_id}").get_json()
    assert batch["status"] == "cancelled"
    assert batch["request_counts"] == {"total": LINES, "completed": 30, "failed": LINES - 30}
    assert batch["progress"]["completion_tokens"] == 30
    output = api.get(f"/v1/files/{batch['output_file_id']}/content").data.decode().splitlines()
    assert [json.loads(line)["custom_id"] for line in output] == [f"c{i}" for i in range(30)]
    assert json.loads(output[0])["response"]["body"]["choices"][0] == {
        "index": 0, "text": "ok", "finish_reason": "stop", "logprobs": None}
    assert api.get(f"/v1/files/{batch['error_file_id']}").get_json()["line_count"] == LINES - 30


def test_lines_with_nul_characters_are_line_errors_not_a_stuck_ingest(database_url, broker,
                                                                      tmp_path):
    # given a batch whose file has a NUL in a custom_id and in a prompt (PostgreSQL text
    # cannot hold NUL: inserting those rows failed the whole ingest, on every round)
    settings = Settings(database_url=database_url, broker_url=broker, model=TINY_MODEL,
                        data_dir=tmp_path)
    api = create_app({"GENQ_SETTINGS": settings}).test_client()
    api.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {make_key(database_url)}"
    batch_id = _create_batch(api, [("ok", "hi"), ("nul\x00id", "hi"), ("nul-prompt", "a\x00b")])

    # when the feeder runs: then the good line is queued and the two others are line errors
    feed_batches(settings)
    batch = api.get(f"/v1/batches/{batch_id}").get_json()
    assert batch["status"] == "in_progress"
    in_batch = Job.batch_id == batch_id
    assert count(database_url, in_batch, Job.status == JobStatus.QUEUED.value) == 1
    assert count(database_url, in_batch, Job.status == JobStatus.FAILED.value) == 2
    errors = api.get(f"/v1/files/{batch['error_file_id']}/content").data.decode().splitlines()
    assert len(errors) == 2 and all("NUL" in line for line in errors)


def test_a_batch_whose_ingest_or_finalize_fails_does_not_stall_the_others(
        database_url, broker, tmp_path, monkeypatch):
    # given two batches, and a fault in the first one's ingest (e.g. a disk error)
    settings = Settings(database_url=database_url, broker_url=broker, model=TINY_MODEL,
                        data_dir=tmp_path)
    api = create_app({"GENQ_SETTINGS": settings}).test_client()
    api.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {make_key(database_url)}"
    broken = _create_batch(api, [("a", "hi")])
    healthy = _create_batch(api, [("b", "hi")])
    from producer import batch_feeder

    insert_lines = batch_feeder._insert_lines

    def failing_for_the_first(settings, batch, lines):
        if batch.id == broken:
            raise OSError("disk I/O error (injected by the test)")
        return insert_lines(settings, batch, lines)

    monkeypatch.setattr(batch_feeder, "_insert_lines", failing_for_the_first)

    # when the feeder runs (twice: a round enqueues what earlier rounds ingested), the second
    # batch is ingested and enqueued all the same (the first one's claim is not stale yet)
    feed_batches(settings)
    feed_batches(settings)
    assert api.get(f"/v1/batches/{broken}").get_json()["status"] == "validating"
    assert api.get(f"/v1/batches/{healthy}").get_json()["status"] == "in_progress"
    assert len(redis_queue_messages(broker, BATCH_QUEUE)) == 1

    # when the first batch's result files cannot be written, the second one still finalizes
    monkeypatch.setattr(batch_feeder, "_insert_lines", insert_lines)
    monkeypatch.setattr(batch_feeder, "INGEST_CLAIM_STALE", batch_feeder.timedelta(0))
    feed_batches(settings)  # the first batch's ingest is retried (its claim is stale)
    assert api.get(f"/v1/batches/{broken}").get_json()["status"] == "in_progress"
    write_result_files = batch_feeder.write_result_files

    def failing_finalize(settings, batch):
        if batch.id == broken:
            raise OSError("No space left on device (injected by the test)")
        return write_result_files(settings, batch)

    monkeypatch.setattr(batch_feeder, "write_result_files", failing_finalize)
    for batch_id in (broken, healthy):
        assert api.post(f"/v1/batches/{batch_id}/cancel").status_code == 200
    feed_batches(settings)
    assert api.get(f"/v1/batches/{broken}").get_json()["status"] == "finalizing"
    assert api.get(f"/v1/batches/{healthy}").get_json()["status"] == "cancelled"

    # and once the fault is gone, the next round finalizes the first one too
    monkeypatch.setattr(batch_feeder, "write_result_files", write_result_files)
    feed_batches(settings)
    assert api.get(f"/v1/batches/{broken}").get_json()["status"] == "cancelled"


def _create_batch_of_bodies(api, bodies: list[tuple[str, dict]]) -> str:
    content = "".join(json.dumps({"custom_id": custom_id, "method": "POST",
                                  "url": "/v1/completions", "body": body}) + "\n"
                      for custom_id, body in bodies).encode()
    file_id = api.post("/v1/files", data={"purpose": "batch", "file": (io.BytesIO(content),
                                                                       "f.jsonl")},
                       content_type="multipart/form-data").get_json()["id"]
    return api.post("/v1/batches", json={"input_file_id": file_id,
                                         "endpoint": "/v1/completions"}).get_json()["id"]


def _limited_api(database_url, broker_url, tmp_path, limits: TenantLimits):
    settings = Settings(database_url=database_url, broker_url=broker_url, model=TINY_MODEL,
                        data_dir=tmp_path, batch_window_jobs=WINDOW, max_model_len=512)
    api = create_app({"GENQ_SETTINGS": settings}).test_client()
    api.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {make_key(database_url)}"
    with db.transaction(database_url) as session:
        set_limits(session, "acme", limits)
    return settings, api


def test_batch_lines_count_against_the_tenants_limits(database_url, broker, tmp_path):
    # given a tenant allowed 40 requests a minute and 5 tokens of output per job
    settings, api = _limited_api(database_url, broker, tmp_path,
                                 TenantLimits(requests_per_minute=40, max_tokens_per_job=5))
    body = {"model": TINY_MODEL, "prompt": "p", "max_tokens": 3}
    bodies = [(f"c{i}", body) for i in range(60)]
    bodies += [("too-long", body | {"max_tokens": 50}), ("too-big", body | {"prompt": "x " * 3000})]
    batch_id = _create_batch_of_bodies(api, bodies)

    # when the feeder runs: the lines over a per-job limit are error lines with their reason,
    # and the minute's allowance paces the window (40 of the 60, not a window of 100)
    feed_batches(settings)
    feed_batches(settings)
    assert len(redis_queue_messages(broker, BATCH_QUEUE)) == 40
    batch = api.get(f"/v1/batches/{batch_id}").get_json()
    assert batch["status"] == "in_progress"
    assert batch["request_counts"]["failed"] == 2
    errors = {line["custom_id"]: line["error"] for line in map(json.loads, api.get(
        f"/v1/files/{batch['error_file_id']}/content").data.decode().splitlines())}
    assert "may ask for at most 5" in errors["too-long"]["message"]
    assert errors["too-big"]["code"] == "context_length_exceeded"

    # then a single submit of the same tenant finds the minute used up by the batch
    answer = api.post("/v1/jobs", json={"model": TINY_MODEL, "prompt": "hi", "max_tokens": 2})
    assert answer.status_code == 429, answer.get_json()


def test_a_tenants_open_batches_share_one_window_and_its_queue_limit(database_url, broker,
                                                                     tmp_path):
    # given a tenant with at most 30 queued jobs and two open batches of 50 lines each
    settings, api = _limited_api(database_url, broker, tmp_path,
                                 TenantLimits(max_queued_jobs=30))
    body = {"model": TINY_MODEL, "prompt": "p", "max_tokens": 3}
    for batch in range(2):
        _create_batch_of_bodies(api, [(f"b{batch}-{i}", body) for i in range(50)])

    # when the feeder runs: 30 lines in all are on the broker, not 2 x 50
    feed_batches(settings)
    feed_batches(settings)
    assert len(redis_queue_messages(broker, BATCH_QUEUE)) == 30


def test_open_batches_of_one_tenant_do_not_multiply_its_window(database_url, broker, tmp_path):
    settings, api = _limited_api(database_url, broker, tmp_path, TenantLimits())
    body = {"model": TINY_MODEL, "prompt": "p", "max_tokens": 3}
    for batch in range(3):
        _create_batch_of_bodies(api, [(f"b{batch}-{i}", body) for i in range(60)])
    feed_batches(settings)
    feed_batches(settings)
    assert len(redis_queue_messages(broker, BATCH_QUEUE)) == WINDOW
