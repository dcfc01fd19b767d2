"""/metrics on the API and on a worker: valid Prometheus text that moves as jobs run, with job
counts that match the database."""

from __future__ import annotations

import json
import re
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from genq import db
from genq.models import Job, Worker
from tests.conftest import free_port
from tests.e2e.conftest import redis_db
from tests.processes import wait_for

METRICS_REDIS_DB = 12
GRAFANA_DASHBOARD = Path(__file__).parents[2] / "grafana" / "genq.json"


def _scrape(url: str) -> dict[str, list]:
    """Metric family name -> its samples, through Prometheus's own text parser."""
    response = requests.get(url, timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return {family.name: family.samples
            for family in text_string_to_metric_families(response.text)}


def _value(metrics: dict, sample_name: str, **labels: str) -> float:
    family = sample_name.removesuffix("_total").removesuffix("_count")
    return sum(sample.value for sample in metrics.get(family, [])
               if sample.name == sample_name
               and all(sample.labels.get(k) == v for k, v in labels.items()))


def _db_count(database_url: str, status: str) -> int:
    with db.session_factory(database_url)() as session:
        return session.scalar(select(func.count()).select_from(Job).where(Job.status == status))


def test_metrics_parse_and_move_as_jobs_run(stack_factory, postgres_url, redis_url):
    worker_port = free_port()
    stack = stack_factory(postgres_url, redis_db(redis_url, METRICS_REDIS_DB),
                          env={"GENQ_WORKER_METRICS_PORT": str(worker_port)})
    worker_pid = next(p.popen.pid for p in stack.group.processes if p.name == "worker")
    api_metrics, worker_metrics = f"{stack.api_url}/metrics", f"http://127.0.0.1:{worker_port}/"
    before = _scrape(api_metrics)
    assert _value(before, "genq_jobs_finished_total", status="succeeded") == 0

    for prompt in ("one", "two", "three"):
        response = requests.post(f"{stack.api_url}/v1/jobs", timeout=40,
                                 json={"prompt": prompt, "max_tokens": 4, "temperature": 0},
                                 headers={"Authorization": f"Bearer {stack.key}",
                                          "Prefer": "wait=30"})
        assert response.json()["status"] == "succeeded", response.text
    wait_for(lambda: _value(_scrape(api_metrics), "genq_workers_live") == 1, 15,
             "the worker's heartbeat")

    # Regression: `genq worker --concurrency 8` sized Celery's threads but left the engine's
    # batch at GENQ_WORKER_CONCURRENCY (32); the heartbeat reports the engine's batch size.
    with db.session_factory(postgres_url)() as session:
        assert session.scalar(select(Worker.max_batch_size)) == 8

    after = _scrape(api_metrics)
    succeeded = _db_count(postgres_url, "succeeded")
    assert succeeded == 3
    assert _value(after, "genq_jobs_finished_total", status="succeeded") == succeeded
    assert _value(after, "genq_jobs", status="succeeded", priority="default") == succeeded
    assert _value(after, "genq_queue_depth", priority="default") == _db_count(postgres_url,
                                                                              "queued") == 0
    assert _value(after, "genq_http_requests_total", route="/v1/jobs", method="POST",
                  status="200") == 3
    assert _value(after, "genq_http_request_duration_seconds_count", route="/v1/jobs") == 3

    worker = _scrape(worker_metrics)
    assert _value(worker, "genq_job_queue_wait_seconds_count", priority="default") == 3
    assert _value(worker, "genq_job_run_seconds_count", priority="default") == 3
    generated = _value(worker, "genq_engine_generation_tokens_total")
    assert generated >= 12
    # Each step runs the batch once and gives each sequence in it at most one token.
    assert 0 < _value(worker, "genq_engine_steps_total") <= generated
    assert _value(worker, "genq_engine_prompt_tokens_total") > 0
    assert 0 <= _value(worker, "genq_engine_kv_cache_usage_ratio") <= 1
    assert "genq_engine_running_requests" in worker
    _assert_grafana_uses_only_exported_metrics(after, worker)
    # The engine runs in a child process; the worker's own process never loads torch.
    maps = Path(f"/proc/{worker_pid}/maps").read_text()
    assert "libtorch" not in maps, "the worker's process loaded torch"
    assert any("libtorch" in Path(f"/proc/{pid}/maps").read_text()
               for pid in _children(worker_pid))
    models = requests.get(f"{stack.api_url}/v1/models", timeout=10,
                          headers={"Authorization": f"Bearer {stack.key}"}).json()
    assert models["object"] == "list"
    assert [(m["id"], m["live_workers"], m["status"]) for m in models["data"]] == [
        ("dummy:tiny-llama", 1, "available")]


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:  # ppid
            children.append(int(stat.parent.name))
    return children


def _assert_grafana_uses_only_exported_metrics(*scrapes: dict) -> None:
    exported = {sample.name for scrape in scrapes for samples in scrape.values()
                for sample in samples}
    panels = json.loads(GRAFANA_DASHBOARD.read_text())["panels"]
    used = {name for panel in panels for target in panel["targets"]
            for name in re.findall(r"genq_\w+", target["expr"])}
    assert used and used <= exported, sorted(used - exported)
