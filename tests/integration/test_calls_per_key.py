"""No key can take every request thread of the API: beyond GENQ_MAX_CALLS_PER_KEY calls in the
Flask pool a key's calls wait their turn (GENQ_MAX_QUEUED_CALLS_PER_KEY of them, holding no
thread), the rest get 429 at once, and other tenants, /healthz and the key's own later calls
answer. Real gunicorn API, real HTTP; the slow calls are uploads whose bodies trickle."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from select import select as readable_among

import pytest
import requests
from sqlalchemy import func, select

from genq import db
from genq.models import Job, Tenant
from tests.conftest import MODEL_CACHE_DIR, TINY_MODEL, empty_redis_db, free_port, make_key
from tests.processes import ProcessGroup, start_api

pytestmark = pytest.mark.integration

CALLS_REDIS_DB = 12  # shared with test_api_server (tests run one at a time)
API_THREADS = 4
CALLS_PER_KEY = API_THREADS // 2  # the default share
QUEUED_PER_KEY = 2
BOUNDARY = "genq-test-boundary"
QUICK_SECONDS = 2.0  # generous for a loaded 2-core host


@dataclass
class Api:
    url: str
    port: int
    key: str  # the tenant sending slow calls
    other_key: str  # another tenant
    database_url: str
    tenant: str = "slow-team"


@pytest.fixture
def api(sqlite_url, redis_url, tmp_path) -> Iterator[Api]:
    broker_url = next(empty_redis_db(redis_url, CALLS_REDIS_DB))
    group = ProcessGroup(tmp_path, {
        **os.environ, "GENQ_DATABASE_URL": sqlite_url, "GENQ_BROKER_URL": broker_url,
        "GENQ_MODEL": TINY_MODEL, "GENQ_MODEL_CACHE_DIR": MODEL_CACHE_DIR,
        "GENQ_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1",
        "GENQ_API_THREADS": str(API_THREADS), "GENQ_MAX_QUEUED_CALLS_PER_KEY": str(QUEUED_PER_KEY),
    })
    port = free_port()
    try:
        start_api(group, port)
        api = Api(f"http://127.0.0.1:{port}", port, make_key(sqlite_url, "slow-team"),
                  make_key(sqlite_url, "other-team"), sqlite_url)
        assert _submit(api, api.other_key).status_code == 202  # the tokenizer is loaded
        yield api
    finally:
        group.stop_all()


class RawCall:
    """An HTTP/1.1 call over a raw socket: its head and `send_now` bytes of its body at once,
    the rest when `finish` is called (a trickled body holds its request thread meanwhile)."""

    def __init__(self, api: Api, head: str, body: bytes, send_now: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", api.port), timeout=10)
        self.sock.sendall(f"{head}Host: 127.0.0.1\r\nConnection: close\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:send_now])
        self.rest = body[send_now:]

    def answered(self) -> bool:
        return bool(readable_among([self.sock], [], [], 0)[0])

    def response(self) -> tuple[int, dict[str, str], str]:
        data = b""
        while chunk := self.sock.recv(65536):
            data += chunk
        self.sock.close()
        head, _, body = data.decode().partition("\r\n\r\n")
        status_line, *header_lines = head.split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in header_lines)
        return int(status_line.split()[1]), headers, body

    def finish(self) -> int:
        self.sock.sendall(self.rest)
        return self.response()[0]

    def abandon(self) -> None:
        self.sock.close()


def trickled_upload(api: Api) -> RawCall:
    """POST /v1/files of the slow tenant, its body stopped after the first 200 bytes."""
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
            f"batch\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"in.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n"
            + '{"custom_id": "a", "body": {"prompt": "Hi"}}\n' * 50
            + f"\r\n--{BOUNDARY}--\r\n").encode()
    return RawCall(api, f"POST /v1/files HTTP/1.1\r\nAuthorization: Bearer {api.key}\r\n"
                   f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n", body, 200)


def waiting_submit(api: Api) -> RawCall:
    """POST /v1/jobs of the slow tenant with `Prefer: wait=30`, its body sent whole."""
    body = b'{"prompt": "Hi", "max_tokens": 4}'
    return RawCall(api, f"POST /v1/jobs HTTP/1.1\r\nAuthorization: Bearer {api.key}\r\n"
                   "Prefer: wait=30\r\nContent-Type: application/json\r\n", body, len(body))


def _submit(api: Api, key: str, **headers: str) -> requests.Response:
    return requests.post(f"{api.url}/v1/jobs", timeout=10, json={"prompt": "Hi", "max_tokens": 4},
                         headers={"Authorization": f"Bearer {key}", **headers})


def _until_jobs_of_key(api: Api, count: int) -> None:
    """Until the slow tenant has `count` jobs (read from the database: no call of the key)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with db.session_factory(api.database_url)() as session:
            if session.scalar(select(func.count()).select_from(Job).where(
                    Job.tenant_id == select(Tenant.id).where(Tenant.name == api.tenant)
                    .scalar_subquery())) == count:
                return
        time.sleep(0.1)
    raise AssertionError(f"the key's {count} jobs were not submitted in time")


def _timed(call, *args) -> tuple[requests.Response, float]:
    began = time.monotonic()
    return call(*args), time.monotonic() - began


def _open(count: int, call: Callable[[], RawCall], held: int) -> tuple[list, list]:
    """`count` calls at once: (those still held, those answered at once), once all but `held`
    were answered (or 5 s passed) and a moment more, so a late answer counts too."""
    calls = [call() for _ in range(count)]
    deadline = time.monotonic() + 5
    while sum(c.answered() for c in calls) < count - held and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    answered = [c for c in calls if c.answered()]
    return [c for c in calls if c not in answered], answered


def test_a_keys_slow_calls_beyond_its_share_wait_or_get_429_and_others_still_answer(api):
    # when one key opens more trickled uploads than there are request threads
    in_turn = CALLS_PER_KEY + QUEUED_PER_KEY
    held, refused = _open(API_THREADS + 2, lambda: trickled_upload(api), in_turn)

    # then its share holds threads, QUEUED_PER_KEY more wait, and the rest were answered at
    # once with 429, JSON and Retry-After
    assert (len(held), len(refused)) == (in_turn, API_THREADS + 2 - in_turn)
    for upload in refused:
        status, headers, body = upload.response()
        assert status == 429 and headers["retry-after"] == "1"
        assert headers["content-type"] == "application/json"
        error = json.loads(body)["error"]
        assert (error["code"], error["param"]) == ("rate_limited", None)
        assert "GENQ_MAX_CALLS_PER_KEY" in error["message"]

    # and meanwhile another tenant submits and reads its job quickly, and /healthz answers
    submitted, seconds = _timed(_submit, api, api.other_key)
    assert submitted.status_code == 202 and seconds < QUICK_SECONDS
    read, seconds = _timed(lambda: requests.get(
        f"{api.url}/v1/jobs/{submitted.json()['id']}", timeout=10,
        headers={"Authorization": f"Bearer {api.other_key}"}))
    assert read.status_code == 200 and seconds < QUICK_SECONDS
    assert requests.get(f"{api.url}/healthz", timeout=QUICK_SECONDS).status_code == 200
    scraped = requests.get(f"{api.url}/metrics", timeout=10).text
    assert f"genq_http_calls_refused_busy_key_total {float(len(refused))}" in scraped

    # when one upload's client goes away mid-body and the others finish, queued ones in turn
    held[0].abandon()
    assert [upload.finish() for upload in held[1:]] == [200] * (in_turn - 1)
    time.sleep(1.0)

    # then every slot is free again: the key holds its full share and queue once more
    held, refused = _open(in_turn + 1, lambda: trickled_upload(api), in_turn)
    assert (len(held), len(refused)) == (in_turn, 1)
    assert [upload.finish() for upload in held] == [200] * in_turn
    assert refused[0].response()[0] == 429


def test_a_handed_off_wait_leaves_the_pool_and_its_slot(api):
    # given CALLS_PER_KEY waits of the key held open (no worker: their jobs never finish)
    waits, answered = _open(CALLS_PER_KEY, lambda: waiting_submit(api), CALLS_PER_KEY)
    assert answered == []
    _until_jobs_of_key(api, CALLS_PER_KEY)  # submitted, so handed off a moment after
    time.sleep(0.5)

    # when the same key makes its full share of calls in the pool
    uploads, refused = _open(CALLS_PER_KEY, lambda: trickled_upload(api), CALLS_PER_KEY)

    # then none is refused: the waits count against the wait caps, not against the pool's
    assert refused == []
    assert [upload.finish() for upload in uploads] == [200] * CALLS_PER_KEY
    for wait in waits:
        wait.abandon()
