"""OpenAI bodies: n choices on the synchronous routes only, unsupported parameters named."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from genq.states import Priority
from producer.openai_compat import CHAT_COMPLETIONS, COMPLETIONS, parse_body, parse_request
from producer.schemas import INT64_MAX

HELLO = {"model": "m", "messages": [{"role": "user", "content": "Hello"}]}


def test_n_choices_get_consecutive_seeds_within_int64():
    request = parse_request(CHAT_COMPLETIONS, {**HELLO, "n": 3, "seed": INT64_MAX},
                            Priority.INTERACTIVE)
    assert request.num_choices == 3
    assert [request.choice(i).seed for i in range(3)] == [INT64_MAX, INT64_MAX - 1,
                                                          INT64_MAX - 2]


def test_a_batch_line_takes_one_choice():
    with pytest.raises(ValidationError) as refused:
        parse_body(CHAT_COMPLETIONS, {**HELLO, "n": 2}, Priority.BATCH)
    assert refused.value.errors()[0]["loc"] == ("n",)


@pytest.mark.parametrize("endpoint, body", [
    (CHAT_COMPLETIONS, {**HELLO, "tools": [{"type": "function"}]}),
    (CHAT_COMPLETIONS, {**HELLO, "response_format": {"type": "json_schema"}}),
    (CHAT_COMPLETIONS, {**HELLO, "logit_bias": {"1": 5}}),
    (COMPLETIONS, {"model": "m", "prompt": "Hi", "best_of": 2}),
])
def test_unsupported_parameters_are_named(endpoint, body):
    with pytest.raises(ValidationError) as refused:
        parse_request(endpoint, body, Priority.INTERACTIVE)
    error = refused.value.errors()[0]
    assert error["type"] == "unsupported_parameter"
    assert error["ctx"]["param"] in body


@pytest.mark.parametrize("harmless", [{"stream": False}, {"store": False}, {"tools": None},
                                      {"response_format": {"type": "text"}},
                                      {"stream_options": {"include_usage": True}}])
def test_default_values_of_unsupported_parameters_pass(harmless):
    assert parse_request(CHAT_COMPLETIONS, {**HELLO, **harmless}, Priority.INTERACTIVE)


def test_stream_is_parsed_with_its_usage_option():
    parsed = parse_request(CHAT_COMPLETIONS, {**HELLO, "stream": True,
                                              "stream_options": {"include_usage": True}},
                           Priority.INTERACTIVE)
    assert (parsed.stream, parsed.include_usage) == (True, True)


@pytest.mark.parametrize("body", [{**HELLO, "stream": True, "n": 2},
                                  {**HELLO, "stream_options": {"include_usage": "maybe"}}])
def test_stream_refuses_what_it_cannot_do(body):
    with pytest.raises(ValidationError):
        parse_request(CHAT_COMPLETIONS, body, Priority.INTERACTIVE)


def test_a_batch_line_cannot_stream():
    with pytest.raises(ValidationError):
        parse_body(CHAT_COMPLETIONS, {**HELLO, "stream": True}, Priority.BATCH)


@pytest.mark.parametrize("endpoint, body, asked", [
    (CHAT_COMPLETIONS, {**HELLO, "logprobs": True, "top_logprobs": 3}, 3),
    (CHAT_COMPLETIONS, {**HELLO, "logprobs": True}, 0),
    (CHAT_COMPLETIONS, {**HELLO, "logprobs": False}, None),
    (CHAT_COMPLETIONS, {**HELLO, "logprobs": False, "top_logprobs": 0}, None),
    (CHAT_COMPLETIONS, HELLO, None),
    (COMPLETIONS, {"model": "m", "prompt": "Hi", "logprobs": 2}, 2),
    (COMPLETIONS, {"model": "m", "prompt": "Hi", "logprobs": 0}, 0),
    (COMPLETIONS, {"model": "m", "prompt": "Hi"}, None),
])
def test_logprobs_map_to_the_engines_count_of_alternatives(endpoint, body, asked):
    job = parse_request(endpoint, body, Priority.INTERACTIVE).job
    assert job.logprobs == asked
    assert job.sampling_params().get("logprobs") == asked


@pytest.mark.parametrize("endpoint, body", [
    (CHAT_COMPLETIONS, {**HELLO, "top_logprobs": 2}),  # without logprobs: true
    (CHAT_COMPLETIONS, {**HELLO, "logprobs": True, "top_logprobs": 21}),
    (CHAT_COMPLETIONS, {**HELLO, "logprobs": True, "stream": True}),
    (COMPLETIONS, {"model": "m", "prompt": "Hi", "logprobs": 6}),
    (COMPLETIONS, {"model": "m", "prompt": "Hi", "logprobs": 1, "stream": True}),
    (COMPLETIONS, {"model": "m", "prompt": "Hi", "logprobs": 1, "top_logprobs": 1}),
])
def test_logprobs_out_of_bounds_are_refused(endpoint, body):
    with pytest.raises(ValidationError):
        parse_request(endpoint, body, Priority.INTERACTIVE)


def test_stored_logprobs_are_returned_in_each_routes_shape():
    from datetime import UTC, datetime

    from genq.models import Job
    from producer.openai_compat import completion_object

    stored = [[" Paris", -0.1, [[" Paris", -0.1], [" Lyon", -2.5]]],
              [".", -0.3, [[".", -0.3], ["!", -1.9]]]]
    common = dict(id="job_x", model="m", created_at=datetime.now(UTC), prompt_tokens=5,
                  completion_tokens=2, output_text=" Paris.", finish_reason="stop",
                  output_logprobs=stored)

    chat = completion_object(Job(messages=[{"role": "user", "content": "?"}], **common))
    text = completion_object(Job(prompt="?", **common))

    content = chat.choices[0].logprobs.content
    assert [(t.token, t.logprob, t.bytes) for t in content] == [
        (" Paris", -0.1, list(b" Paris")), (".", -0.3, [46])]
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [(" Paris", -0.1),
                                                                       (" Lyon", -2.5)]
    legacy = text.choices[0].logprobs
    assert legacy.tokens == [" Paris", "."] and legacy.token_logprobs == [-0.1, -0.3]
    assert legacy.top_logprobs == [{" Paris": -0.1, " Lyon": -2.5}, {".": -0.3, "!": -1.9}]
    assert legacy.text_offset == [0, 6]
