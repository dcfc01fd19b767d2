"""The `genq` command against a real API under gunicorn (no worker: jobs stay queued): each
API error is one line with its code and a non-zero exit; list and cancel work."""

from __future__ import annotations

import json
import os
from urllib.parse import urlparse

import pytest
import redis

from tests.conftest import MODEL_CACHE_DIR, TINY_MODEL, free_port, make_key
from tests.processes import ProcessGroup, start_api
from tests.unit.test_cli import assert_one_line_error, genq

pytestmark = pytest.mark.integration
TEST_REDIS_DB = 11


@pytest.fixture
def api(tmp_path, sqlite_url, redis_url):
    broker_url = urlparse(redis_url)._replace(path=f"/{TEST_REDIS_DB}").geturl()
    redis.Redis.from_url(broker_url).flushdb()
    group = ProcessGroup(tmp_path, {
        **os.environ, "GENQ_DATABASE_URL": sqlite_url, "GENQ_BROKER_URL": broker_url,
        "GENQ_MODEL": TINY_MODEL, "GENQ_MODEL_CACHE_DIR": MODEL_CACHE_DIR,
        "GENQ_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1",
    })
    port = free_port()
    start_api(group, port)
    try:
        yield {"GENQ_API_URL": f"http://127.0.0.1:{port}", "GENQ_API_KEY": make_key(sqlite_url),
               "GENQ_DATABASE_URL": sqlite_url}
    finally:
        group.stop_all()


def test_api_errors_are_one_line_with_their_code(api, tmp_path):
    assert_one_line_error(genq("get", "job_nope", cwd=tmp_path, **api), "not_found")
    assert_one_line_error(genq("cancel", "job_nope", cwd=tmp_path, **api), "not_found")
    assert_one_line_error(genq("batch", "status", "batch_nope", cwd=tmp_path, **api),
                          "not_found")
    assert_one_line_error(genq("batch", "download", "batch_nope", cwd=tmp_path, **api),
                          "not_found")
    lines = tmp_path / "lines.jsonl"
    lines.write_text("")
    refused_window = genq("batch", "submit", str(lines), "--window", "forever", cwd=tmp_path,
                          **api)
    assert_one_line_error(refused_window, "invalid_request")
    assert "completion_window" in refused_window.stderr
    refused = genq("submit", "x", "--max-tokens", "-1", cwd=tmp_path, **api)
    assert_one_line_error(refused, "invalid_request")
    assert "max_tokens" in refused.stderr and "HTTP 422" in refused.stderr
    wrong_key = genq("list", cwd=tmp_path, **{**api, "GENQ_API_KEY": "gq_wrong"})
    assert_one_line_error(wrong_key, "unauthorized")


def test_submit_list_and_cancel(api, tmp_path):
    submitted = genq("submit", "hello", "--max-tokens", "4", cwd=tmp_path, **api)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["id"]

    queued = json.loads(genq("list", "--status", "queued", cwd=tmp_path, **api).stdout)
    assert [job["id"] for job in queued["data"]] == [job_id]

    canceled = genq("cancel", job_id, cwd=tmp_path, **api)
    assert canceled.returncode == 0, canceled.stderr
    assert json.loads(canceled.stdout)["status"] == "canceled"
    listed = json.loads(genq("list", "--status", "canceled", cwd=tmp_path, **api).stdout)
    assert [job["id"] for job in listed["data"]] == [job_id]
    assert_one_line_error(genq("cancel", job_id, cwd=tmp_path, **api), "conflict")


def test_a_revoked_key_is_refused(api, tmp_path):
    tenant_keys = json.loads(genq("keys", "list", "acme", cwd=tmp_path, **api).stdout)
    assert genq("list", cwd=tmp_path, **api).returncode == 0
    assert genq("keys", "revoke", tenant_keys[0]["id"], cwd=tmp_path, **api).returncode == 0
    assert_one_line_error(genq("list", cwd=tmp_path, **api), "unauthorized")
