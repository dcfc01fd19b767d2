"""Model versions at the API: a routing rule picks each job's version and queue, `model@version`
pins one (422 for an unknown one), `/v1/models` lists versions, and /metrics and the dashboard
show them side by side. Real Redis and both DBs; workers are stood in for by heartbeat rows
(tests/e2e/test_model_versions.py runs real ones)."""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update

from genq import db, routing
from genq.models import Job, Outbox, utcnow
from genq.queues import queue_for
from genq.routing import RoutingRule, RuleError
from genq.settings import Settings
from genq.states import JobStatus, Priority
from producer.batch_feeder import feed_batches
from producer.submit import load_tokenizer_cached
from results_api.app import create_app
from tests.conftest import (
    MODEL_CACHE_DIR,
    TINY_MODEL,
    empty_redis_db,
    make_key,
    redis_queue_messages,
)
from workers import heartbeat

pytestmark = pytest.mark.integration

ROUTING_REDIS_DB = 7


@pytest.fixture
def broker_url(redis_url) -> Iterator[str]:
    yield from empty_redis_db(redis_url, ROUTING_REDIS_DB)


@pytest.fixture
def settings(database_url, broker_url) -> Settings:
    load_tokenizer_cached(TINY_MODEL, Path(MODEL_CACHE_DIR))
    return Settings(database_url=database_url, broker_url=broker_url, model=TINY_MODEL,
                    model_cache_dir=MODEL_CACHE_DIR)


@pytest.fixture
def api(settings):
    client = create_app({"GENQ_SETTINGS": settings}).test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {make_key(settings.database_url)}"
    return client


def _set_rule(settings: Settings, *weights: str, **options) -> RoutingRule:
    with db.transaction(settings.database_url) as session:
        return routing.set_rule(session, RoutingRule(TINY_MODEL, routing.parse_weights(
            list(weights)), **options))


def _beat(settings: Settings, version: str | None, worker_id: str) -> None:
    heartbeat.beat(settings.model_copy(update={"model_version": version or ""}), worker_id, 0)


def _submit(api, model: str = TINY_MODEL, **fields):
    return api.post("/v1/jobs", json={"prompt": "Hello", "max_tokens": 4, "model": model,
                                      **fields})


def _job_and_queue(settings: Settings, job_id: str) -> tuple[Job, str]:
    with db.session_factory(settings.database_url)() as session:
        job = session.get(Job, job_id)
        queue = session.scalar(select(Outbox.queue).where(Outbox.job_id == job_id))
    return job, queue


def test_a_model_without_a_rule_stays_unversioned(api, settings, broker_url):
    _beat(settings, "v2", "host:2")  # a versioned worker alone does not version the model

    job_id = _submit(api).get_json()["id"]

    job, queue = _job_and_queue(settings, job_id)
    assert job.model_version is None and queue == queue_for(TINY_MODEL, Priority.DEFAULT)
    assert len(redis_queue_messages(broker_url, queue)) == 1


def test_a_rule_routes_each_job_to_a_versions_queue_and_records_it(api, settings, broker_url):
    _set_rule(settings, "v1=50", "v2=50")
    _beat(settings, "v1", "host:1")
    _beat(settings, "v2", "host:2")

    ids = [_submit(api).get_json()["id"] for _ in range(40)]

    jobs = [_job_and_queue(settings, job_id) for job_id in ids]
    assert set(Counter(job.model_version for job, _ in jobs)) == {"v1", "v2"}
    assert all(queue == queue_for(TINY_MODEL, Priority.DEFAULT, job.model_version)
               for job, queue in jobs)
    for version in ("v1", "v2"):
        queue = queue_for(TINY_MODEL, Priority.DEFAULT, version)
        assert len(redis_queue_messages(broker_url, queue)) == sum(
            job.model_version == version for job, _ in jobs)


def test_a_pinned_version_is_kept_whatever_the_weights(api, settings, broker_url):
    _set_rule(settings, "v1=100", "v2=0")

    response = _submit(api, f"{TINY_MODEL}@v2")

    assert response.status_code == 202, response.get_data(as_text=True)
    assert (response.get_json()["model"], response.get_json()["model_version"]) == (
        TINY_MODEL, "v2")
    job, queue = _job_and_queue(settings, response.get_json()["id"])
    assert (job.model_version, queue) == ("v2", queue_for(TINY_MODEL, Priority.DEFAULT, "v2"))
    assert queue.endswith("@v2.default")


@pytest.mark.parametrize("model", [f"{TINY_MODEL}@v9", "unknown-model@v1"])
def test_an_unknown_pinned_version_is_a_422_on_model(api, settings, model):
    _set_rule(settings, "v1=100")

    response = _submit(api, model)

    assert response.status_code == 422
    error = response.get_json()["error"]
    assert (error["code"], error["param"]) == ("invalid_request", "model")
    with db.session_factory(settings.database_url)() as session:
        assert session.scalar(select(Job.id)) is None


def test_a_pinned_version_of_a_live_worker_needs_no_rule(api, settings):
    _beat(settings, "v3", "host:3")

    job_id = _submit(api, f"{TINY_MODEL}@v3").get_json()["id"]

    assert _job_and_queue(settings, job_id)[0].model_version == "v3"
    model = next(m for m in api.get("/v1/models").get_json()["data"] if m["id"] == TINY_MODEL)
    assert model["routing"] is None
    assert [(v["version"], v["queued"]) for v in model["versions"]] == [("v3", 1)]


def test_an_unserved_versions_share_goes_to_the_live_ones_or_waits(api, settings):
    _set_rule(settings, "v1=50", "v2=50")
    _beat(settings, "v1", "host:1")  # v2 has no live worker

    rerouted = {_job_and_queue(settings, _submit(api).get_json()["id"])[0].model_version
                for _ in range(20)}
    _set_rule(settings, "v1=50", "v2=50", when_unserved=routing.WAIT)
    time.sleep(routing.RULES_TTL_SECONDS)  # every API process reads the new rule by then
    waiting = {_job_and_queue(settings, _submit(api).get_json()["id"])[0].model_version
               for _ in range(20)}

    assert rerouted == {"v1"} and waiting == {"v1", "v2"}


def test_bulk_submit_and_sticky_tenant_route_all_of_a_tenants_jobs_alike(api, settings):
    _set_rule(settings, "v1=50", "v2=50", sticky="tenant")
    _beat(settings, "v1", "host:1")
    _beat(settings, "v2", "host:2")

    response = api.post("/v1/jobs/bulk", json={"jobs": [
        {"prompt": "Hi", "max_tokens": 2} for _ in range(30)]})

    assert response.status_code == 202, response.get_data(as_text=True)
    versions = {_job_and_queue(settings, job["id"])[0].model_version
                for job in response.get_json()["data"]}
    assert len(versions) == 1


def test_models_lists_versions_weights_and_live_workers(api, settings):
    _set_rule(settings, "v1=90", "v2=10", sticky="tenant")
    _beat(settings, "v1", "host:1")
    _beat(settings, "v1", "host:2")
    _beat(settings, "v3", "host:3")

    model = next(m for m in api.get("/v1/models").get_json()["data"] if m["id"] == TINY_MODEL)

    assert model["routing"]["sticky"] == "tenant"
    assert model["routing"]["when_unserved"] == "reroute"
    assert [(v["version"], v["weight"], v["live_workers"], v["queued"], v["status"])
            for v in model["versions"]] == [
        ("v1", 90, 2, 0, "available"), ("v2", 10, 0, 0, "no_live_worker"),
        ("v3", 0, 1, 0, "available")]


def test_rollback_puts_everything_on_the_previous_rules_main_version(settings):
    _set_rule(settings, "v1=100")
    _set_rule(settings, "v1=50", "v2=50", sticky="tenant")
    _set_rule(settings, "v1=10", "v2=90", sticky="tenant")

    with db.transaction(settings.database_url) as session:
        rolled = routing.rollback(session, TINY_MODEL)
    with db.session_factory(settings.database_url)() as session:
        history = routing.rule_history(session, TINY_MODEL)

    assert (rolled.weights, rolled.sticky) == ((("v1", 100),), "tenant")
    assert [rule.weights for rule in history] == [
        (("v1", 100),), (("v1", 10), ("v2", 90)), (("v1", 50), ("v2", 50)), (("v1", 100),)]


def test_rollback_without_an_earlier_rule_is_refused(settings):
    _set_rule(settings, "v1=90", "v2=10")

    with pytest.raises(RuleError), db.transaction(settings.database_url) as session:
        routing.rollback(session, TINY_MODEL)


def test_metrics_and_dashboard_show_versions_side_by_side(api, settings):
    _set_rule(settings, "v1=50", "v2=50")
    _beat(settings, "v1", "host:1")
    _beat(settings, "v2", "host:2")
    for version, status, tokens in (("v1", JobStatus.SUCCEEDED, 4), ("v1", JobStatus.SUCCEEDED, 6),
                                    ("v2", JobStatus.FAILED, None)):
        job_id = _submit(api, f"{TINY_MODEL}@{version}").get_json()["id"]
        with db.transaction(settings.database_url) as session:
            session.execute(update(Job).where(Job.id == job_id).values(
                status=status.value, completion_tokens=tokens,
                finished_at=utcnow() + timedelta(seconds=2)))

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(api.get("/metrics").get_data(
                   as_text=True)) for s in family.samples}
    page = api.get("/dashboard").get_data(as_text=True)

    v1 = (("model", TINY_MODEL), ("version", "v1"))
    v2 = (("model", TINY_MODEL), ("version", "v2"))
    assert samples["genq_version_weight", v1] == 50
    assert samples["genq_version_workers_live", v2] == 1
    assert samples["genq_version_jobs", (*v1[:1], ("outcome", "succeeded"), v1[1])] == 2
    assert samples["genq_version_jobs", (*v2[:1], ("outcome", "failed"), v2[1])] == 1
    assert samples["genq_version_generated_tokens_per_second", v1] == pytest.approx(10 / 300)
    assert samples["genq_version_latency_seconds", (*v1[:1], ("quantile", "0.95"), v1[1])] > 1
    assert f'data-version="{TINY_MODEL}@v1"' in page and f'data-version="{TINY_MODEL}@v2"' in page


def test_batch_lines_are_routed_and_published_to_their_versions_queues(settings, broker_url,
                                                                        tmp_path):
    settings = settings.model_copy(update={"data_dir": tmp_path})
    api = create_app({"GENQ_SETTINGS": settings}).test_client()
    api.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {make_key(settings.database_url)}"
    _set_rule(settings, "v1=100", "v2=0")
    models = [TINY_MODEL] * 6 + [f"{TINY_MODEL}@v2"] * 4 + [f"{TINY_MODEL}@v9"]
    content = "".join(json.dumps({
        "custom_id": f"c{n}", "method": "POST", "url": "/v1/completions",
        "body": {"model": model, "prompt": "Hi", "max_tokens": 2}}) + "\n"
        for n, model in enumerate(models)).encode()
    file_id = api.post("/v1/files", data={"purpose": "batch", "file": (io.BytesIO(content),
                                                                       "f.jsonl")},
                       content_type="multipart/form-data").get_json()["id"]
    batch_id = api.post("/v1/batches", json={"input_file_id": file_id,
                                             "endpoint": "/v1/completions"}).get_json()["id"]

    feed_batches(settings)
    feed_batches(settings)

    with db.session_factory(settings.database_url)() as session:
        lines = session.execute(select(Job.custom_id, Job.status, Job.model_version)
                                .where(Job.batch_id == batch_id)).all()
    assert Counter((status, version) for _, status, version in lines) == {
        ("queued", "v1"): 6, ("queued", "v2"): 4, ("failed", None): 1}
    for version, expected in (("v1", 6), ("v2", 4)):
        queue = queue_for(TINY_MODEL, Priority.BATCH, version)
        assert len(redis_queue_messages(broker_url, queue)) == expected
