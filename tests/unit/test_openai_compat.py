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
    (COMPLETIONS, {"model": "m", "prompt": "Hi", "logprobs": 2}),
])
def test_unsupported_parameters_are_named(endpoint, body):
    with pytest.raises(ValidationError) as refused:
        parse_request(endpoint, body, Priority.INTERACTIVE)
    error = refused.value.errors()[0]
    assert error["type"] == "unsupported_parameter"
    assert error["ctx"]["param"] in body


@pytest.mark.parametrize("harmless", [{"stream": False}, {"store": False}, {"logprobs": False},
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
