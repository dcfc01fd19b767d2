"""The API as a service: startup refusal, health checks, OpenAPI and docs, and the real
gunicorn server over HTTP with the Python client."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from cli.services import API_WORKER_CLASS
from genq.db import SchemaOutOfDate
from genq.settings import Settings
from producer.client import GenqAPIError, GenqClient
from results_api.app import create_app
from tests.conftest import MODEL_CACHE_DIR, TINY_MODEL, empty_redis_db, free_port, make_key

pytestmark = pytest.mark.integration

TEST_REDIS_DB = 12
LOW_OPEN_FILES = 256
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def broker_url(redis_url) -> Iterator[str]:
    yield from empty_redis_db(redis_url, TEST_REDIS_DB)


def make_client(database_url: str, broker_url: str):
    settings = Settings(database_url=database_url, broker_url=broker_url, model=TINY_MODEL)
    return create_app({"GENQ_SETTINGS": settings}).test_client()


def test_api_refuses_to_start_on_a_database_without_the_schema(tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'empty.db'}")

    with pytest.raises(SchemaOutOfDate, match="genq db upgrade"):
        create_app({"GENQ_SETTINGS": settings})


def test_healthz_answers_without_a_key(sqlite_url, broker_url):
    response = make_client(sqlite_url, broker_url).get("/healthz")
    assert (response.status_code, response.get_json()) == (200, {"status": "ok"})


def test_readyz_is_200_when_database_and_broker_are_up(database_url, broker_url):
    response = make_client(database_url, broker_url).get("/readyz")

    assert response.status_code == 200
    assert response.get_json()["checks"] == {"database": "ok", "broker": "ok"}


@pytest.mark.parametrize("broker", ["redis://127.0.0.1:{port}/0",
                                    "amqp://guest:guest@127.0.0.1:{port}//"])
def test_readyz_is_503_naming_the_broker_when_it_is_down(sqlite_url, broker):
    started = time.monotonic()
    response = make_client(sqlite_url, broker.format(port=free_port())).get("/readyz")

    assert response.status_code == 503
    assert time.monotonic() - started < 3
    body = response.get_json()
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["broker"].startswith("error")
    assert body["error"]["code"] == "service_unavailable" and "broker" in body["error"]["message"]


def test_readyz_is_200_with_rabbitmq(sqlite_url, rabbitmq_url):
    assert make_client(sqlite_url, rabbitmq_url).get("/readyz").status_code == 200


def test_openapi_document_is_generated_from_the_request_models(sqlite_url, broker_url):
    document = make_client(sqlite_url, broker_url).get("/openapi.json").get_json()

    assert document["openapi"].startswith("3.1")
    assert {"/v1/jobs", "/v1/jobs/{id}", "/v1/jobs/{id}/cancel", "/healthz", "/readyz"} <= set(
        document["paths"])
    schemas = document["components"]["schemas"]
    assert {"JobRequest", "JobResponse", "JobList", "ErrorResponse", "Message"} <= set(schemas)
    assert schemas["JobRequest"]["additionalProperties"] is False
    assert "max_tokens" in schemas["JobRequest"]["properties"]
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    request_body = document["paths"]["/v1/jobs"]["post"]["requestBody"]
    assert request_body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobRequest"}
    assert "$defs" not in str(document)


def test_docs_page_is_self_contained_html(sqlite_url, broker_url):
    response = make_client(sqlite_url, broker_url).get("/docs")

    page = response.get_data(as_text=True)
    assert response.status_code == 200 and response.mimetype == "text/html"
    assert "/v1/jobs/{id}/cancel" in page and "JobRequest" in page
    assert "<script src" not in page and "cdn" not in page.lower()


# --- the real server ------------------------------------------------------------------


@pytest.fixture
def server(sqlite_url, broker_url, tmp_path):
    """gunicorn as `genq api` runs it, configured only through GENQ_* variables: (base URL,
    API key, the master's pid)."""
    port = free_port()
    env = os.environ | {
        "GENQ_DATABASE_URL": sqlite_url,
        "GENQ_BROKER_URL": broker_url,
        "GENQ_MODEL": TINY_MODEL,
        "GENQ_DATA_DIR": str(tmp_path / "data"),
        "GENQ_MODEL_CACHE_DIR": MODEL_CACHE_DIR,  # the tokenizer is converted once, shared
        "GENQ_MAX_BODY_BYTES": "2048",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--worker-class", API_WORKER_CLASS,
         "-w", "2", "-b", f"127.0.0.1:{port}", "--config", "python:results_api.gunicorn_config",
         "results_api.asgi:create_asgi_app()"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        preexec_fn=_start_with_few_open_files,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_serving(base_url, process)
        yield base_url, make_key(sqlite_url), process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _start_with_few_open_files() -> None:
    """As on a host whose default soft limit is low (1024 is common; 256 here)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOW_OPEN_FILES, hard))


def _open_files_limits(pid: int) -> tuple[int, str]:
    """(soft, hard) of a process's 'Max open files', from /proc (hard may be 'unlimited')."""
    line = next(line for line in Path(f"/proc/{pid}/limits").read_text().splitlines()
                if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), hard


def _wait_until_serving(base_url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"gunicorn exited:\n{process.stdout.read().decode()}")
        try:
            requests.get(base_url + "/healthz", timeout=5)
            return
        except (requests.ConnectionError, requests.Timeout):  # bound, workers still booting
            time.sleep(0.1)
    pytest.fail("gunicorn did not answer /healthz within 30 s")


def test_gunicorn_serves_the_api_over_http(server):
    base_url, key, _ = server
    client = GenqClient(base_url, key, timeout=30)

    job = client.submit(messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=8,
                        idempotency_key="http-1")
    assert job["status"] == "queued"
    assert client.submit(messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=8,
                         idempotency_key="http-1")["id"] == job["id"]
    assert client.get(job["id"])["id"] == job["id"]
    assert [listed["id"] for listed in client.list(status="queued")["data"]] == [job["id"]]
    assert client.cancel(job["id"])["status"] == "canceled"
    assert client.wait(job["id"], timeout=5)["status"] == "canceled"

    with pytest.raises(GenqAPIError) as conflict:
        client.cancel(job["id"])
    assert (conflict.value.status, conflict.value.code) == (409, "conflict")
    with pytest.raises(GenqAPIError) as invalid:
        client.submit(prompt="x", top_p=0)
    assert (invalid.value.status, invalid.value.param) == (422, "top_p")
    with pytest.raises(GenqAPIError) as unauthorized:
        GenqClient(base_url, "gq_wrong").get(job["id"])
    assert unauthorized.value.status == 401


def test_gunicorn_rejects_a_large_body_by_content_length(server):
    base_url, key, _ = server
    response = requests.post(f"{base_url}/v1/jobs", data=b"{" + b" " * 4096 + b"}",
                             headers={"Authorization": f"Bearer {key}",
                                      "Content-Type": "application/json"}, timeout=10)

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_gunicorn_answers_unknown_routes_with_json(server):
    base_url, _, _ = server
    response = requests.get(f"{base_url}/nowhere", timeout=10)

    assert response.status_code == 404
    assert response.headers["Content-Type"] == "application/json"


def test_the_api_raises_its_open_files_limit_for_thousands_of_waits(server):
    # Given the API started with a soft limit of 256 open files (the `server` fixture)
    _, _, master = server
    workers = [int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text()
               .split()]

    # Then the master and each worker may open up to OPEN_FILES_WANTED files (or the hard cap)
    from results_api.gunicorn_config import OPEN_FILES_WANTED

    assert len(workers) == 2
    for pid in [master, *workers]:
        soft, hard = _open_files_limits(pid)
        assert soft == (OPEN_FILES_WANTED if hard == "unlimited"
                        else min(OPEN_FILES_WANTED, int(hard))), (pid, soft, hard)
        assert soft > LOW_OPEN_FILES
