"""Streaming on a real stack (gunicorn API, Celery worker with its engine process, Redis,
SQLite): the openai client's `stream=True`, `GET /v1/jobs/{id}/events` with Last-Event-ID, and
a client that goes away. The deltas always join to the job's committed output_text."""

from __future__ import annotations

import json
import os
from pathlib import Path

import requests

from genq.job_events import EventKind, JobEventLog
from tests.conftest import TINY_MODEL, make_key
from tests.e2e.batch_support import openai_client
from tests.e2e.conftest import redis_db
from tests.faults.sitecustomize import FAIL_AT_TOKENS_VARIABLE
from tests.processes import wait_for


def sse_events(response: requests.Response, limit: int | None = None) -> list[dict]:
    """Parse server-sent events (event, id, data as JSON) until the stream ends or `limit`."""
    events, event = [], {}
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith(":"):
            continue
        if not line:
            if event:
                events.append(event)
                event = {}
                if limit is not None and len(events) >= limit:
                    break
            continue
        name, _, value = line.partition(": ")
        event[name] = json.loads(value) if name == "data" else value
    return events


def headers(stack, **more) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.key}", **more}


def get_job(stack, job_id: str) -> dict:
    return requests.get(f"{stack.api_url}/v1/jobs/{job_id}", headers=headers(stack),
                        timeout=10).json()


def submit(stack, **body) -> dict:
    response = requests.post(f"{stack.api_url}/v1/jobs", json=body, headers=headers(stack),
                             timeout=10)
    assert response.status_code == 202, response.text
    return response.json()


def test_openai_client_streams_chat_and_completions(stack_factory, sqlite_url, redis_url):
    # given a genq stack and the official openai client
    stack = stack_factory(sqlite_url, redis_db(redis_url))
    client = openai_client(stack)

    # when a chat completion is streamed, with the usage chunk asked for
    chunks = list(client.chat.completions.create(
        model=TINY_MODEL, messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}))

    # then chunks of the chat.completion.chunk kind carry the text, the last choice chunk the
    # finish reason, and a last chunk with no choices the usage
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2
    # and they join to the job's committed output
    job = get_job(stack, chunks[0].id.removeprefix("chatcmpl-"))
    assert job["status"] == "succeeded" and text == job["output"]["text"]

    # when a legacy completion is streamed, then text_completion chunks join to its output
    chunks = list(client.completions.create(model=TINY_MODEL, prompt="Once upon a time",
                                            max_tokens=16, temperature=0, stream=True))
    assert {chunk.object for chunk in chunks} == {"text_completion"}
    job = get_job(stack, chunks[0].id.removeprefix("cmpl-"))
    assert "".join(chunk.choices[0].text for chunk in chunks) == job["output"]["text"]


def test_job_events_resume_replay_and_stay_with_their_tenant(stack_factory, sqlite_url,
                                                               redis_url):
    # given an async job long enough to be read in two parts
    stack = stack_factory(sqlite_url, redis_db(redis_url))
    job = submit(stack, prompt="Count with me:", max_tokens=300, temperature=0)
    url = f"{stack.api_url}/v1/jobs/{job['id']}/events"

    # when its events are read until a few deltas came, and the connection dropped
    with requests.get(url, headers=headers(stack), stream=True, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        first = []
        for event in sse_events(response):
            first.append(event)
            if sum(e["event"] == "delta" for e in first) == 3:
                break
    # and read again from the last event id
    assert sum(e["event"] == "delta" for e in first) == 3 and first[-1]["event"] == "delta"
    last_id = first[-1]["id"]
    with requests.get(url, headers=headers(stack, **{"Last-Event-ID": last_id}), stream=True,
                      timeout=60) as response:
        rest = sse_events(response)

    # then status came before the deltas, the resumed stream ends with the job, and the two
    # parts' deltas join to the committed output, in token order
    assert first[0] == {"event": "status", "data": {"status": first[0]["data"]["status"]}}
    assert rest[-1]["event"] == "job" and rest[-1]["data"]["status"] == "succeeded"
    deltas = [e for e in first + rest if e["event"] == "delta"]
    offsets = [int(e["id"].split("-")[1]) for e in deltas]
    assert offsets == sorted(set(offsets)) and offsets[-1] == 300
    assert int(last_id.split("-")[1]) == offsets[2] < offsets[3]
    assert "".join(e["data"]["text"] for e in deltas) == rest[-1]["data"]["output"]["text"]

    # when the finished job's events are read again, then its final event is replayed
    with requests.get(url, headers=headers(stack), stream=True, timeout=30) as response:
        replay = sse_events(response)
    assert replay[-1] == rest[-1]
    assert "".join(e["data"]["text"] for e in replay if e["event"] == "delta") == \
        rest[-1]["data"]["output"]["text"]

    # when another tenant asks for them, then the job does not exist for it
    other = make_key(stack.database_url, tenant="globex")
    response = requests.get(url, headers={"Authorization": f"Bearer {other}"}, timeout=10)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_a_stream_open_across_a_failed_engine_step_joins_to_the_committed_output(
        stack_factory, sqlite_url, redis_url):
    # Regression (issue 19): after a failed step the engine re-ran the request from scratch,
    # and the stream showed the first run's text and then the whole re-run's.
    # given a stack whose engine fails its step once a request has 8 tokens
    faults = str(Path(__file__).parents[1] / "faults")
    stack = stack_factory(sqlite_url, redis_db(redis_url), extra_env={
        FAIL_AT_TOKENS_VARIABLE: "8",
        "PYTHONPATH": os.pathsep.join(filter(None, [faults, os.environ.get("PYTHONPATH")]))})

    # when a completion of 32 tokens is streamed across that step
    chunks = list(openai_client(stack).completions.create(
        model=TINY_MODEL, prompt="Once upon a time", max_tokens=32, temperature=0,
        stream=True))

    # then the step failed and the request ran again in the engine
    assert "engine step failed; re-running its 1 requests" in stack.group.logs()
    # and the chunks join to the job's committed output, all 32 tokens of it
    job = get_job(stack, chunks[0].id.removeprefix("cmpl-"))
    assert job["status"] == "succeeded" and job["usage"]["completion_tokens"] == 32
    assert "".join(chunk.choices[0].text for chunk in chunks) == job["output"]["text"]
    # and so do the job's events as the worker published them: one delta per token but the
    # last (it comes from the row), none repeated, their text the start of the output
    events = JobEventLog(redis_db(redis_url)).read(job["id"], None, 1.0)
    deltas = [event for event in events if event.kind is EventKind.DELTA]
    assert [event.id.offset for event in deltas] == list(range(1, 32))
    streamed = "".join(event.text for event in deltas)
    assert events[-1].kind is EventKind.ENDED and events[-1].chars == len(streamed)
    assert job["output"]["text"].startswith(streamed) and len(streamed) > 0


def test_a_stream_holds_a_wait_slot_and_going_away_cancels_its_job_keeping_output(
        stack_factory, sqlite_url, redis_url):
    # given a tenant with one wait slot, and a streamed completion that would run for long
    stack = stack_factory(sqlite_url, redis_db(redis_url),
                          extra_env={"GENQ_MAX_WAITS_PER_TENANT": "1"})
    body = {"model": TINY_MODEL, "prompt": "Count forever:", "max_tokens": 1900,
            "temperature": 0, "stream": True}
    url = f"{stack.api_url}/v1/completions"
    response = requests.post(url, json=body, headers=headers(stack), stream=True, timeout=30)
    chunks = []
    # `lines` stays referenced: abandoned, urllib3 would close the connection at once (which
    # the API, on its event loop, notices at once: the slot would be free below).
    lines = response.iter_lines(decode_unicode=True)
    for line in lines:
        if line.startswith("data: "):
            chunks.append(json.loads(line.removeprefix("data: ")))
        if len(chunks) >= 5:
            break
    job_id = chunks[0]["id"].removeprefix("cmpl-")

    # then a second stream of the tenant, beyond its slot, is refused before it is queued
    refused = requests.post(url, json={**body, "max_tokens": 4}, headers=headers(stack),
                            timeout=10)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"

    # when the client closes the connection mid-stream
    response.close()

    # then the job is canceled, and its partial output (at least what was sent) is kept
    wait_for(lambda: get_job(stack, job_id)["status"] == "canceled", 20, "the cancel")
    wait_for(lambda: get_job(stack, job_id)["output"] is not None, 10, "the partial output")
    job = get_job(stack, job_id)
    assert job["output"]["finish_reason"] == "abort"
    assert 0 < job["usage"]["completion_tokens"] < 1900
    assert job["output"]["text"].startswith("".join(c["choices"][0]["text"] for c in chunks))
    # and its slot is free again
    again = requests.post(url, json={**body, "max_tokens": 4}, headers=headers(stack),
                          timeout=30)
    assert again.status_code == 200 and again.text.endswith("data: [DONE]\n\n")


def test_on_rabbitmq_a_stream_gets_status_and_the_final_output(stack_factory, postgres_url,
                                                               rabbitmq_url):
    # given a stack on RabbitMQ, which has no Redis for token deltas
    stack = stack_factory(postgres_url, rabbitmq_url)
    client = openai_client(stack)

    # when a chat completion is streamed, then its text comes whole, as the job stored it
    chunks = list(client.chat.completions.create(
        model=TINY_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
        temperature=0, stream=True))
    job = get_job(stack, chunks[0].id.removeprefix("chatcmpl-"))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == job["output"]["text"]
    assert chunks[-1].choices[0].finish_reason == "length"

    # and a job's events are its status changes, one delta with its output, and the job
    job = submit(stack, prompt="Hello", max_tokens=8, temperature=0)
    with requests.get(f"{stack.api_url}/v1/jobs/{job['id']}/events", headers=headers(stack),
                      stream=True, timeout=30) as response:
        events = sse_events(response)
    assert events[0]["event"] == "status"
    assert [e["event"] for e in events[-2:]] == ["delta", "job"]
    assert events[-2]["data"]["text"] == events[-1]["data"]["output"]["text"]
