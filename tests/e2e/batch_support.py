"""Helpers shared by the batch and OpenAI-client e2e tests."""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest

from tests.conftest import TINY_MODEL
from tests.e2e.conftest import redis_db

# Not the shared e2e database (13): these tests run beside other suites on one Redis.
BATCH_REDIS_DB = 7
FINISHED = ("completed", "failed", "expired", "cancelled")


@pytest.fixture
def batch_env(monkeypatch) -> None:
    """A feeder that ticks fast and sync completions that give up before a test would."""
    monkeypatch.setenv("GENQ_BATCH_FEEDER_INTERVAL_SECONDS", "0.2")
    monkeypatch.setenv("GENQ_COMPLETION_TIMEOUT_SECONDS", "30")


def batch_redis(redis_url: str) -> str:
    return redis_db(redis_url, BATCH_REDIS_DB)


def chat_line(custom_id: str, content: str, max_tokens: int = 4) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": TINY_MODEL, "max_tokens": max_tokens, "temperature": 0,
                     "messages": [{"role": "user", "content": content}]}}


def write_jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def openai_client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key=stack.key, max_retries=0,
                         timeout=60)


def submit_batch(client: openai.OpenAI, path: Path, window: str = "24h", **kwargs):
    uploaded = client.files.create(file=path.open("rb"), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                 completion_window=window, **kwargs)


def wait_for_batch(client: openai.OpenAI, batch_id: str, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in FINISHED:
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch}"
        time.sleep(0.3)
    return batch


def jsonl(client: openai.OpenAI, file_id: str) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]
