"""Waits and streams hold no request thread (issues 18, 19): one API process with no worker
keeps hundreds of `Prefer: wait` calls and SSE streams open, answers /healthz meanwhile, and
ends every one of them correctly once its job finishes."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import requests
from sqlalchemy import select

from genq import db
from genq.job_store import transition
from genq.models import Job, utcnow
from genq.states import JobStatus
from results_api.gunicorn_config import raise_open_files_limit
from tests.conftest import make_key
from tests.e2e.conftest import redis_db

OPEN_WAITS_REDIS_DB = 9
NUM_WAITS = 300
NUM_STREAMS = 300
JOB = {"prompt": "Hello there", "max_tokens": 4}


def test_hundreds_of_waits_and_streams_stay_open_and_end_with_their_jobs(
        stack_factory, sqlite_url, redis_url):
    raise_open_files_limit(4 * (NUM_WAITS + NUM_STREAMS) + 1024)
    # given one API process and no worker (no job finishes on its own), and two tenants whose
    # calls all arrive at once (a key's calls beyond its share of the request threads queue
    # for them; the default queue, 64 a key, would turn most of this burst away)
    stack = stack_factory(sqlite_url, redis_db(redis_url, OPEN_WAITS_REDIS_DB), worker=False,
                          extra_env={"GENQ_MAX_QUEUED_CALLS_PER_KEY": str(NUM_WAITS + NUM_STREAMS)})
    streamer_key = make_key(sqlite_url, "streamer")
    asyncio.run(_open_then_finish(stack, streamer_key))


async def _open_then_finish(stack, streamer_key: str) -> None:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    timeout = httpx.Timeout(120, connect=30)
    async with httpx.AsyncClient(base_url=stack.api_url, limits=limits, timeout=timeout) as api:
        bulk = await api.post("/v1/jobs/bulk", headers=_auth(streamer_key),
                              json={"jobs": [JOB] * NUM_STREAMS})
        assert bulk.status_code == 202, bulk.text
        streamed_ids = [job["id"] for job in bulk.json()["data"]]

        # when one tenant opens 300 waits and the other 300 event streams
        opened: list[str] = []
        waits = [asyncio.ensure_future(api.post(
            "/v1/jobs", headers=_auth(stack.key) | {"Prefer": "wait=60"}, json=JOB))
            for _ in range(NUM_WAITS)]
        streams = [asyncio.ensure_future(_follow(api, streamer_key, job_id, opened))
                   for job_id in streamed_ids]
        await _until(lambda: len(opened) == NUM_STREAMS
                     and _num_jobs(stack.database_url) == NUM_WAITS + NUM_STREAMS, 90)
        await asyncio.sleep(1.0)

        # then every one of them is held open: no wait answered (no 202, no 429)
        answered = [wait.result() for wait in waits if wait.done()]
        assert answered == [], [(r.status_code, r.text[:200]) for r in answered[:3]]
        assert not any(stream.done() for stream in streams)
        # and /healthz and /readyz answer meanwhile (a hang detector, not a speed test)
        for path in ("/healthz", "/readyz") * 3:
            began = time.monotonic()
            response = await asyncio.to_thread(requests.get, stack.api_url + path, timeout=5)
            assert response.status_code == 200
            assert time.monotonic() - began < 1.0, path

        # when every job finishes
        await asyncio.to_thread(_finish_queued_jobs, stack.database_url)

        # then every wait answers 200 with its finished job, and every stream ends with it
        replies = await asyncio.wait_for(asyncio.gather(*waits), 60)
        assert {r.status_code for r in replies} == {200}
        assert {r.json()["status"] for r in replies} == {"succeeded"}
        assert {r.headers["Preference-Applied"] for r in replies} == {"wait=60"}
        assert {r.json()["output"]["text"] for r in replies} == {"done"}
        finals = await asyncio.wait_for(asyncio.gather(*streams), 60)
        assert sorted(job["id"] for job in finals) == sorted(streamed_ids)
        assert {(job["status"], job["output"]["text"]) for job in finals} == {
            ("succeeded", "done")}


async def _follow(api: httpx.AsyncClient, key: str, job_id: str, opened: list[str]) -> dict:
    """The job event of the job's stream, its last."""
    async with api.stream("GET", f"/v1/jobs/{job_id}/events", headers=_auth(key)) as response:
        assert response.status_code == 200, await response.aread()
        opened.append(job_id)
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "job":
                return json.loads(line.removeprefix("data: "))
    raise AssertionError(f"the stream of {job_id} ended without its job")


def _finish_queued_jobs(database_url: str) -> None:
    with db.transaction(database_url) as session:
        job_ids = session.scalars(select(Job.id).where(
            Job.status == JobStatus.QUEUED.value)).all()
        for job_id in job_ids:
            assert transition(session, job_id, JobStatus.RUNNING, started_at=utcnow())
    with db.transaction(database_url) as session:
        for job_id in job_ids:
            assert transition(session, job_id, JobStatus.SUCCEEDED, output_text="done",
                              finish_reason="stop", prompt_tokens=3, completion_tokens=1,
                              finished_at=utcnow())


def _num_jobs(database_url: str) -> int:
    with db.session_factory(database_url)() as session:
        return len(session.scalars(select(Job.id)).all())


async def _until(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, "the waits and streams did not all open in time"
        await asyncio.sleep(0.5)


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


