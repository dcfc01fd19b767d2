"""The request schema and its error mapping: what a client gets back for each invalid body."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from genq.errors import ErrorCode
from producer.schemas import JobRequest
from results_api.errors import validation_error


def parse(body: dict) -> JobRequest:
    return JobRequest.from_json(json.dumps(body))


def first_error(body: dict):
    with pytest.raises(ValidationError) as caught:
        parse(body)
    return validation_error(caught.value)


def test_defaults_fill_the_engine_sampling_params():
    request = parse({"prompt": "Hello"})

    assert request.sampling_params() == {
        "max_tokens": 256, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "seed": None,
        "stop": None,
    }
    assert request.priority.value == "default"


def test_json_numbers_fill_float_fields():
    assert parse({"prompt": "x", "temperature": 0, "top_p": 1}).temperature == 0.0


def test_a_single_stop_string_becomes_a_list():
    assert parse({"prompt": "x", "stop": "\n"}).stop == ["\n"]


def test_unknown_field_names_the_field():
    error = first_error({"prompt": "x", "temprature": 0.5})

    assert (error.code, error.param) == (ErrorCode.INVALID_REQUEST, "temprature")
    assert "unknown field" in error.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "max_tokens": 8193}, "max_tokens"),
        ({"prompt": "x", "temperature": 2.5}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_k": -2}, "top_k"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "x", "stop": ["a", ""]}, "stop.1"),
        ({"prompt": "x", "priority": "urgent"}, "priority"),
        ({"prompt": "x", "metadata": {"k": 1}}, "metadata.k"),
        ({"prompt": "x", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"prompt": "x", "metadata": {"k": "v" * 513}}, "metadata.k"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "hi", "name": "x"}]}, "messages.0.name"),
    ],
)
def test_invalid_values_name_their_param(body, param):
    assert first_error(body).param == param


def test_both_prompt_and_messages_is_rejected():
    error = first_error({"prompt": "x", "messages": [{"role": "user", "content": "hi"}]})

    assert error.param == "messages"
    assert "exactly one" in error.message


def test_neither_prompt_nor_messages_is_rejected():
    assert first_error({"max_tokens": 5}).param == "prompt"


@pytest.mark.parametrize("field, value", [
    ("top_k", 10**30), ("seed", -(10**26)), ("seed", 2**63), ("presence_penalty", 2.5),
    ("frequency_penalty", -3), ("repetition_penalty", 0), ("repetition_penalty", 11),
    ("stop", ["x" * 257]), ("stop", ["a", "b", "c", "d", "e"]),
])
def test_every_numeric_sampling_field_is_bounded_at_submit(field, value):
    """Out-of-range values used to pass and overflow inside the engine step, aborting every
    neighbour of the batch (issue 18)."""
    error = first_error({"prompt": "Hi", field: value})
    assert error.code == ErrorCode.INVALID_REQUEST
    assert error.param.split(".")[0] == field


def test_the_largest_allowed_values_reach_the_engine_as_given():
    from engine.sampling_params import SamplingParams

    request = parse({"prompt": "Hi", "top_k": 1_000_000, "seed": 2**63 - 1,
                     "presence_penalty": 2, "frequency_penalty": -2, "repetition_penalty": 10,
                     "stop": ["x" * 256] * 4})
    params = request.sampling_params()
    assert (params["presence_penalty"], params["frequency_penalty"]) == (2, -2)
    SamplingParams(**params)  # the engine takes every bounded value


def test_webhook_events_take_the_payload_names_too():
    request = parse({"prompt": "Hi", "webhook_url": "https://example.com/hook",
                     "webhook_events": ["job.succeeded", "failed"]})
    assert request.webhook_events == ["succeeded", "failed"]
    assert first_error({"prompt": "Hi", "webhook_url": "https://example.com/hook",
                        "webhook_events": ["job.done"]}).param == "webhook_events.0"
