"""The official `openai` package, unchanged, against a real genq stack (gunicorn API, Celery
worker, tiny model): a whole batch (upload, create, poll, download, parse) and single calls."""

from __future__ import annotations

import openai
import pytest

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
from tests.processes import wait_for

pytestmark = pytest.mark.usefixtures("batch_env")


@pytest.mark.parametrize("backend", ["redis+sqlite", "rabbitmq+postgres"])
def test_openai_client_runs_a_batch_and_single_calls(
        backend, stack_factory, request, tmp_path):
    # given a genq stack and a 12-line JSONL file written for OpenAI's Batch API
    if backend == "redis+sqlite":
        stack = stack_factory(request.getfixturevalue("sqlite_url"),
                              batch_redis(request.getfixturevalue("redis_url")))
    else:
        stack = stack_factory(request.getfixturevalue("postgres_url"),
                              request.getfixturevalue("rabbitmq_url"))
    client = openai_client(stack)
    path = write_jsonl(tmp_path / "requests.jsonl",
                       [chat_line(f"req-{i}", f"Say {i}") for i in range(12)])

    # when it is uploaded, run as a batch and polled to the end
    uploaded = client.files.create(file=path.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"team": "search"})
    assert batch.status == "validating"
    batch = wait_for_batch(client, batch.id)

    # then every line has a chat.completion in the output file, in the input's order
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (12, 12, 0)
    assert batch.metadata == {"team": "search"}
    assert uploaded.bytes == path.stat().st_size
    lines = jsonl(client, batch.output_file_id)
    assert [line["custom_id"] for line in lines] == [f"req-{i}" for i in range(12)]
    for line in lines:
        assert line["error"] is None
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["model"] == TINY_MODEL
        choice = body["choices"][0]
        assert choice["message"]["role"] == "assistant"
        assert choice["finish_reason"] in ("stop", "length")
        assert choice["logprobs"] is None
        assert body["usage"]["completion_tokens"] <= 4
        assert body["usage"]["total_tokens"] == (body["usage"]["prompt_tokens"]
                                                 + body["usage"]["completion_tokens"])
    assert client.files.content(batch.error_file_id).text == ""
    assert batch.progress["tokens_per_second"] > 0  # genq extension, kept by the client

    # and single calls work through the same client, queued at interactive priority
    chat = client.chat.completions.create(
        model=TINY_MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=5,
        temperature=0)
    completion = client.completions.create(model=TINY_MODEL, prompt="Once upon a time",
                                           max_tokens=6, temperature=0)
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens <= 5
    assert completion.object == "text_completion"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 6
    with pytest.raises(openai.UnprocessableEntityError) as bad_request:
        client.chat.completions.create(model=TINY_MODEL, messages=[], max_tokens=5)
    assert bad_request.value.body["param"] == "messages"
    assert "messages" in bad_request.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        client.batches.retrieve("batch_nope")
    assert missing.value.body["code"] == "not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key="wrong",
                      max_retries=0).files.list()


def test_partial_output_is_downloadable_while_the_batch_runs_and_cancel_keeps_it(
        stack_factory, sqlite_url, redis_url, monkeypatch, tmp_path):
    # given a worker taking two lines at a time and a batch window of 2
    monkeypatch.setenv("GENQ_BATCH_WINDOW_JOBS", "2")
    stack = stack_factory(sqlite_url, batch_redis(redis_url), concurrency=2)
    client = openai_client(stack)
    path = write_jsonl(tmp_path / "long.jsonl",
                       [chat_line(f"r{i}", "Count", max_tokens=120) for i in range(30)])
    batch = submit_batch(client, path)

    # when some lines have finished but not all
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2, 60,
             "two lines to finish")
    partial = jsonl(client, batch.output_file_id)
    running = client.batches.retrieve(batch.id)

    # then the output file already holds them, and cancelling keeps them
    assert running.status == "in_progress"
    assert 2 <= len(partial) < 30
    assert all(line["response"]["status_code"] == 200 for line in partial)
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    final = wait_for_batch(client, batch.id)
    assert final.status == "cancelled"
    counts = final.request_counts
    assert counts.total == 30 and counts.completed >= len(partial)
    assert counts.completed + counts.failed == 30
    output, errors = jsonl(client, final.output_file_id), jsonl(client, final.error_file_id)
    assert len(output) == counts.completed and len(errors) == counts.failed
    assert {error["error"]["code"] for error in errors} == {"batch_cancelled"}
    assert client.files.retrieve(final.output_file_id).bytes > 0


def test_openai_parameters_people_send(stack_factory, sqlite_url, redis_url):
    """Penalties reach the engine, n > 1 gives n choices, stream_options passes; parameters
    genq does not implement get OpenAI's 400 `unsupported_parameter` naming them; a sampling
    value the engine could overflow on is refused at submit."""
    from sqlalchemy import select

    from genq import db
    from genq.models import Job

    stack = stack_factory(sqlite_url, batch_redis(redis_url))
    client = openai_client(stack)
    hello = [{"role": "user", "content": "Hello"}]

    # given penalties: the job carries them to the engine and succeeds
    chat = client.chat.completions.create(model=TINY_MODEL, messages=hello, max_tokens=4,
                                          presence_penalty=1.5, frequency_penalty=-0.5,
                                          stream_options=None)
    with db.transaction(stack.database_url) as session:
        params = session.scalar(select(Job.sampling_params)
                                .where(Job.id == chat.id.removeprefix("chatcmpl-")))
    assert (params["presence_penalty"], params["frequency_penalty"]) == (1.5, -0.5)

    # n = 3 with a seed: three choices, prompt counted once
    three = client.chat.completions.create(model=TINY_MODEL, messages=hello, max_tokens=3,
                                           n=3, seed=7, temperature=1.0)
    assert [choice.index for choice in three.choices] == [0, 1, 2]
    assert 3 <= three.usage.completion_tokens <= 9
    single = client.chat.completions.create(model=TINY_MODEL, messages=hello, max_tokens=3)
    assert three.usage.prompt_tokens == single.usage.prompt_tokens
    texts = client.completions.create(model=TINY_MODEL, prompt="Once", max_tokens=2, n=2)
    assert len(texts.choices) == 2 and texts.usage.completion_tokens == 4

    # log-probabilities: each generated token with its most likely alternatives (greedy: the
    # token is the most likely one)
    scored = client.chat.completions.create(model=TINY_MODEL, messages=hello, max_tokens=4,
                                            temperature=0, logprobs=True, top_logprobs=2)
    content = scored.choices[0].logprobs.content
    assert len(content) == scored.usage.completion_tokens == 4
    assert all(len(token.top_logprobs) == 2 and token.logprob <= 0 for token in content)
    assert all(token.logprob == token.top_logprobs[0].logprob for token in content)
    legacy = client.completions.create(model=TINY_MODEL, prompt="Once", max_tokens=3,
                                       temperature=0, logprobs=1).choices[0].logprobs
    assert len(legacy.tokens) == len(legacy.token_logprobs) == len(legacy.top_logprobs) == 3

    # parameters genq does not implement: OpenAI's error naming each one
    unsupported = {
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "response_format": {"type": "json_object"}, "store": True,
        "parallel_tool_calls": True,
    }
    for name, value in unsupported.items():
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=TINY_MODEL, messages=hello, max_tokens=2,
                                           **{name: value})
        assert refused.value.body["code"] == "unsupported_parameter", refused.value.body
        assert refused.value.body["param"] == name
        assert f"`{name}` is not supported" in refused.value.body["message"]

    # out-of-range sampling values: 422 before anything is queued
    for extra in ({"top_k": 10**30}, {"seed": -(10**26)}, {"presence_penalty": 3},
                  {"n": 9}, {"stop": ["x" * 1000]}):
        with pytest.raises(openai.UnprocessableEntityError) as bad:
            client.chat.completions.create(model=TINY_MODEL, messages=hello, max_tokens=2,
                                           extra_body=extra)
        assert bad.value.body["param"].split(".")[0] == next(iter(extra)), bad.value.body
