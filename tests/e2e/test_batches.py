"""Batches beyond OpenAI, on a real stack: bad lines do not sink a batch (unless strict),
expiry at the end of the completion window keeps results, retry re-runs only what did not
succeed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import requests

from tests.conftest import TINY_MODEL
from tests.e2e.batch_support import (
    batch_env,  # noqa: F401 (fixture)
    batch_redis,
    chat_line,
    jsonl,
    openai_client,
    submit_batch,
    wait_for_batch,
    write_jsonl,
)

pytestmark = pytest.mark.usefixtures("batch_env")


def messy_file(path):
    """Three good lines among malformed ones, blank lines, CRLF, a BOM and non-ASCII text."""
    good = [chat_line("a", "Bonjour"), chat_line("b", "héllo 東京 🚀"), chat_line("c", "hi")]
    wrong_url = chat_line("e", "x") | {"url": "/v1/completions"}
    wrong_method = chat_line("f", "x") | {"method": "GET"}
    too_hot = chat_line("g", "x")
    too_hot["body"]["temperature"] = 5
    no_messages = chat_line("h", "x")
    del no_messages["body"]["messages"]
    lines = [
        "\ufeff" + json.dumps(good[0]),                        # 1: BOM
        json.dumps(good[1], ensure_ascii=False),                # 2: UTF-8, CRLF below
        "",                                                     # 3: blank
        '{"custom_id": "d", "method": "POST",',                 # 4: bad JSON
        json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}),  # 5
        json.dumps(chat_line("a", "again")),                    # 6: duplicate custom_id
        json.dumps(wrong_url),                                  # 7
        json.dumps(wrong_method),                               # 8
        json.dumps(too_hot),                                    # 9
        json.dumps(no_messages),                                # 10
        "   ",                                                  # 11: blank
        json.dumps(good[2]),                                    # 12
    ]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8"))
    return path


EXPECTED_ERRORS = [
    (4, None, "line 4: not valid JSON: Expecting property name enclosed in double quotes "
              "(column 37)"),
    (5, None, "line 5: missing custom_id: a non-empty string is required"),
    (6, "a", "line 6: duplicate custom_id 'a' (first used on line 1)"),
    (7, "e", "line 7: url must be the batch's endpoint '/v1/chat/completions', "
             "got '/v1/completions'"),
    (8, "f", "line 8: method must be \"POST\", got 'GET'"),
    (9, "g", "line 9: invalid body: temperature: Input should be less than or equal to 2"),
    (10, "h", "line 10: invalid body: messages: Field required"),
]


def test_malformed_lines_go_to_the_error_file_and_the_good_lines_run(
        stack_factory, sqlite_url, redis_url, tmp_path):
    """Through the openai client, in strict mode, and through the `genq batch` CLI."""
    # given a file with 3 good and 7 malformed lines
    stack = stack_factory(sqlite_url, batch_redis(redis_url))
    client = openai_client(stack)
    path = messy_file(tmp_path / "messy.jsonl")

    # when it runs as a normal batch and as a strict one
    batch = wait_for_batch(client, submit_batch(client, path).id)
    strict = wait_for_batch(client, submit_batch(client, path, metadata={"strict": "true"}).id)

    # then each bad line is reported with its number, and the good lines have results
    assert batch.status == "completed", batch
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (10, 3, 7)
    errors = jsonl(client, batch.error_file_id)
    assert [(e["error"]["line"], e["custom_id"], e["error"]["message"]) for e in errors] == (
        EXPECTED_ERRORS)
    assert {e["error"]["code"] for e in errors} == {"invalid_request"}
    assert all(e["response"] is None for e in errors)
    output = jsonl(client, batch.output_file_id)
    assert [line["custom_id"] for line in output] == ["a", "b", "c"]
    assert all(line["response"]["body"]["choices"][0]["message"]["content"] is not None
               for line in output)
    # strict (OpenAI's all-or-nothing): the batch fails validation and nothing runs
    assert strict.status == "failed"
    assert [(error.line, error.code) for error in strict.errors.data] == [
        (line, "invalid_request") for line, _, _ in EXPECTED_ERRORS]
    assert strict.request_counts.total == 0

    # and `genq batch` does the same from the shell: submit --wait, download, status
    env = {**os.environ, "GENQ_API_URL": stack.api_url, "GENQ_API_KEY": stack.key,
           "COLUMNS": "200"}

    submitted = subprocess.run([sys.executable, "-m", "cli", "batch", "submit", str(path),
                                "--wait"], env=env, capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    cli_batch = json.loads(submitted.stdout)
    downloaded = subprocess.run([sys.executable, "-m", "cli", "batch", "download",
                                 cli_batch["id"], "-o", str(tmp_path / "out")],
                                env=env, capture_output=True, text=True, timeout=60)
    status = subprocess.run([sys.executable, "-m", "cli", "batch", "status", cli_batch["id"]],
                            env=env, capture_output=True, text=True, timeout=60)

    assert cli_batch["status"] == "completed"
    assert cli_batch["request_counts"] == {"total": 10, "completed": 3, "failed": 7}
    assert "done 3 failed 7 of 10" in submitted.stderr
    assert downloaded.returncode == 0, downloaded.stderr
    saved = tmp_path / "out" / cli_batch["id"]
    cli_output = [json.loads(line) for line in open(f"{saved}_output.jsonl")]
    cli_errors = [json.loads(line) for line in open(f"{saved}_error.jsonl")]
    assert [line["custom_id"] for line in cli_output] == ["a", "b", "c"]
    assert [line["error"]["line"] for line in cli_errors] == [4, 5, 6, 7, 8, 9, 10]
    assert json.loads(status.stdout)["id"] == cli_batch["id"]


def test_expiry_keeps_results_and_retry_reruns_only_unfinished_lines(
        stack_factory, sqlite_url, redis_url, monkeypatch, tmp_path):
    # given one slow engine slot, a window of one job and a 2-second completion window
    monkeypatch.setenv("GENQ_BATCH_WINDOW_JOBS", "1")
    stack = stack_factory(sqlite_url, batch_redis(redis_url), concurrency=1)
    client = openai_client(stack)
    lines = [chat_line(f"r{i}", "Count to a hundred", max_tokens=150) for i in range(10)]
    path = write_jsonl(tmp_path / "slow.jsonl", lines)
    with path.open("a") as handle:
        handle.write("not json\n")  # a malformed line: never retried, it has no request

    # when the window ends before the lines do
    expired = wait_for_batch(client, submit_batch(client, path, window="2s").id)

    # then the finished lines are kept, the others are expired in the error file
    assert expired.status == "expired", expired
    counts = expired.request_counts
    assert counts.total == 11 and counts.completed + counts.failed == 11
    assert counts.completed < 10
    output, errors = jsonl(client, expired.output_file_id), jsonl(client, expired.error_file_id)
    done = {line["custom_id"] for line in output}
    expired_ids = {e["custom_id"] for e in errors if e["error"]["code"] == "batch_expired"}
    assert len(done) == counts.completed
    assert done | expired_ids == {f"r{i}" for i in range(10)} and not done & expired_ids
    assert [e["error"]["line"] for e in errors if e["error"]["code"] == "invalid_request"] == [11]

    # and a retry runs exactly the expired lines, under their original line numbers
    response = requests.post(f"{stack.api_url}/v1/batches/{expired.id}/retry",
                             json={"completion_window": "24h"},
                             headers={"Authorization": f"Bearer {stack.key}"}, timeout=30)
    assert response.status_code == 200, response.text
    retried = wait_for_batch(client, response.json()["id"], timeout=120)
    assert retried.status == "completed", retried
    assert retried.model_extra["retried_from"] == expired.id
    assert retried.request_counts.total == len(expired_ids)
    rerun = jsonl(client, retried.output_file_id)
    assert {line["custom_id"] for line in rerun} == expired_ids
    assert all(line["response"]["body"]["model"] == TINY_MODEL for line in rerun)
