"""The autoscaling signals on a real API's /metrics, and the KEDA / HPA files of
docs/autoscaling.md naming only metrics and labels that genq really exports."""

from __future__ import annotations

import math
import re
from datetime import timedelta
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from genq import db
from genq.models import Job, Worker, utcnow
from tests.conftest import TINY_MODEL
from tests.e2e.conftest import redis_db

AUTOSCALING_REDIS_DB = 10
DEPLOY_DIR = Path(__file__).parents[2] / "deploy" / "autoscaling"
TARGET_BACKLOG_SECONDS = 20.0
WINDOW_SECONDS = 60.0
METRIC_NAME = re.compile(r"\bgenq_[a-z_]+\b")
SELECTOR = re.compile(r"\b(genq_[a-z_]+)\{([^}]*)\}")


def _signals(api_url: str) -> dict[tuple[str, str, str], float]:
    """(metric, model, priority) -> value, for the two autoscaling gauges."""
    text = requests.get(f"{api_url}/metrics", timeout=10).text
    return {(sample.name, sample.labels["model"], sample.labels["priority"]): sample.value
            for family in text_string_to_metric_families(text)
            if family.name in ("genq_queue_backlog_seconds", "genq_desired_workers")
            for sample in family.samples}


def _exported(api_url: str) -> dict[str, set[str]]:
    """Metric family -> the label names its samples carry."""
    text = requests.get(f"{api_url}/metrics", timeout=10).text
    return {family.name: {label for sample in family.samples for label in sample.labels}
            for family in text_string_to_metric_families(text)}


def _strings(node) -> list[str]:
    """Every string in a parsed YAML document, with embedded YAML (a ConfigMap's config.yaml)
    parsed in turn."""
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in [str(key), *_strings(value)]]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    if isinstance(node, str) and "\n" in node:
        return [node, *_strings(yaml.safe_load(node))]
    return [str(node)]


def _deploy_documents() -> list[dict]:
    return [doc for path in sorted(DEPLOY_DIR.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def _submit(stack, count: int, priority: str) -> None:
    for number in range(count):
        response = requests.post(
            f"{stack.api_url}/v1/jobs", timeout=60,  # the first loads the tokenizer
            json={"prompt": f"job {number}", "max_tokens": 50, "priority": priority},
            headers={"Authorization": f"Bearer {stack.key}"})
        assert response.status_code == 202, response.text


def _queued_tokens(database_url: str, priority: str) -> int:
    with db.session_factory(database_url)() as session:
        return session.scalar(select(func.sum(Job.admitted_tokens)).where(
            Job.status == "queued", Job.priority == priority))


def _add_fleet(database_url: str, tenant_id: str, finished_tokens: int) -> None:
    """One live worker up for ten minutes that finished `finished_tokens` just now."""
    now = utcnow()
    with db.transaction(database_url) as session:
        session.add(Worker(id="worker-1:1", hostname="worker-1", model=TINY_MODEL,
                           max_batch_size=8, num_running=0,
                           started_at=now - timedelta(minutes=10), last_heartbeat_at=now))
        for tokens in (finished_tokens // 2, finished_tokens - finished_tokens // 2):
            session.add(Job(tenant_id=tenant_id, model=TINY_MODEL, status="succeeded",
                            priority="default", prompt="done", admitted_tokens=tokens,
                            created_at=now - timedelta(seconds=20),
                            started_at=now - timedelta(seconds=10), finished_at=now))


def test_deploy_files_are_complete_keda_and_hpa_objects():
    documents = _deploy_documents()
    kinds = {doc["kind"]: doc for doc in documents}
    assert kinds["ScaledObject"]["apiVersion"].startswith("keda.sh/")
    trigger = kinds["ScaledObject"]["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert METRIC_NAME.search(trigger["metadata"]["query"])
    hpa = kinds["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["metrics"][0]["type"] == "External"
    assert METRIC_NAME.fullmatch(hpa["spec"]["metrics"][0]["external"]["metric"]["name"])
    for doc in (kinds["ScaledObject"], hpa):
        assert doc["spec"]["scaleTargetRef"]["name"]


def test_scaling_signals_on_a_real_api_match_the_files_and_the_formula(
        stack_factory, database_url, redis_url):
    # Given an API with queued jobs and no worker at all (scale from zero)
    stack = stack_factory(database_url, redis_db(redis_url, AUTOSCALING_REDIS_DB), worker=False,
                          extra_env={"GENQ_TARGET_BACKLOG_SECONDS": str(TARGET_BACKLOG_SECONDS),
                                     "GENQ_THROUGHPUT_WINDOW_SECONDS": str(WINDOW_SECONDS)})
    _submit(stack, 6, "interactive")

    # Then every metric and label the KEDA and HPA files use is exported
    exported = _exported(stack.api_url)
    named = {name for doc in _deploy_documents() for text in _strings(doc)
             for name in METRIC_NAME.findall(text)}
    assert named >= {"genq_desired_workers"}
    assert named <= set(exported), named - set(exported)
    for doc in _deploy_documents():
        for text in _strings(doc):
            for name, matchers in SELECTOR.findall(text):
                labels = {m.split("=")[0].strip().rstrip("!~") for m in matchers.split(",")
                          if "=" in m and "<<" not in m}
                assert labels <= exported[name], (name, labels)
    hpa = next(doc for doc in _deploy_documents() if doc["kind"] == "HorizontalPodAutoscaler")
    selector = hpa["spec"]["metrics"][0]["external"]["metric"]["selector"]["matchLabels"]
    assert set(selector) <= exported["genq_desired_workers"]

    # And the queued class asks for a worker, the empty classes for none
    signals = _signals(stack.api_url)
    assert signals["genq_desired_workers", TINY_MODEL, "interactive"] >= 1
    assert signals["genq_queue_backlog_seconds", TINY_MODEL, "interactive"] == math.inf
    assert signals["genq_desired_workers", TINY_MODEL, "batch"] == 0
    assert signals["genq_queue_backlog_seconds", TINY_MODEL, "batch"] == 0

    # When a worker has finished 3,000 tokens of work in the window (50 tokens/s)
    with db.session_factory(database_url)() as session:
        tenant_id = session.scalar(select(Job.tenant_id).limit(1))
    _add_fleet(database_url, tenant_id, finished_tokens=3000)

    # Then backlog = queued work / 50 tokens/s and desired = that backlog over the target
    queued = _queued_tokens(database_url, "interactive")
    tokens_per_second = 3000 / WINDOW_SECONDS
    signals = _signals(stack.api_url)
    backlog = signals["genq_queue_backlog_seconds", TINY_MODEL, "interactive"]
    assert backlog == pytest.approx(queued / tokens_per_second, rel=0.01)
    desired = signals["genq_desired_workers", TINY_MODEL, "interactive"]
    assert desired == pytest.approx(queued / (TARGET_BACKLOG_SECONDS * tokens_per_second),
                                    rel=0.01)
    assert signals["genq_desired_workers", TINY_MODEL, "default"] == 0
