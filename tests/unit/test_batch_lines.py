"""Parsing batch input lines, the batch state machine and OpenAI body translation."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from genq.batch_states import BATCH_ALLOWED_SOURCES, BatchStatus, can_transition_batch
from genq.states import Priority
from producer.batch_lines import parse_batch_file
from producer.batch_schemas import window_of
from producer.openai_compat import CHAT_COMPLETIONS, COMPLETIONS, parse_body

CHAT = {"model": "m", "messages": [{"role": "developer", "content": [
    {"type": "text", "text": "Be "}, {"type": "text", "text": "brief"}]},
    {"role": "user", "content": "hi"}], "max_completion_tokens": 7, "stop": "\n"}


def test_chat_body_becomes_a_job_request():
    request = parse_body(CHAT_COMPLETIONS, CHAT, Priority.BATCH)

    assert [m.model_dump() for m in request.messages] == [
        {"role": "system", "content": "Be brief"}, {"role": "user", "content": "hi"}]
    assert (request.max_tokens, request.stop, request.priority) == (7, ["\n"], Priority.BATCH)


def test_completion_body_defaults_to_openai_max_tokens():
    request = parse_body(COMPLETIONS, b'{"model": "m", "prompt": ["once"]}', Priority.INTERACTIVE)

    assert (request.prompt, request.max_tokens) == ("once", 16)


def test_parse_batch_file_handles_bom_crlf_blanks_and_duplicates(tmp_path):
    line = {"custom_id": "a", "method": "POST", "url": COMPLETIONS,
            "body": {"model": "m", "prompt": "é"}}
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(line).encode() + b"\r\n\r\n  \n"
                     + json.dumps(line).encode() + b"\n\xff\n[1]")

    parsed = list(parse_batch_file(path, COMPLETIONS))

    assert [(p.number, p.custom_id, p.error) for p in parsed] == [
        (1, "a", None),
        (4, "a", "duplicate custom_id 'a' (first used on line 1)"),
        (5, None, "not valid UTF-8 (invalid start byte at byte 0)"),
        (6, None, "a line must be a JSON object"),
    ]
    assert parsed[0].request.prompt == "é"


def test_batch_states_reach_a_terminal_state_only_through_finalizing():
    terminal = {BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}

    assert all(BATCH_ALLOWED_SOURCES[state] == {BatchStatus.FINALIZING} for state in terminal)
    assert can_transition_batch(BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING)
    assert not can_transition_batch(BatchStatus.COMPLETED, BatchStatus.CANCELLING)
    assert BatchStatus.FAILED.is_terminal and not BatchStatus.FINALIZING.is_terminal


@pytest.mark.parametrize(("window", "expected"), [("24h", timedelta(hours=24)),
                                                  ("90s", timedelta(seconds=90))])
def test_completion_window(window, expected):
    assert window_of(window) == expected


@pytest.mark.parametrize("window", ["0h", "8d", "24", "169h"])
def test_bad_completion_window(window):
    with pytest.raises(ValueError):
        window_of(window)
