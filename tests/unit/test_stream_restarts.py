"""A streamed completion never disagrees with its job: a rerun (its worker lost) is sent only
past the text the client already has, and a rerun that differs ends the stream instead."""

from __future__ import annotations

from genq.job_events import EventId
from producer.job_stream import Delta
from results_api.completion_chunks import _SentText


def _delta(attempt: int, offset: int, text: str) -> Delta:
    return Delta(EventId(attempt, offset), text, ())


def test_a_rerun_that_repeats_the_streamed_text_sends_only_what_is_new():
    # given "Once upon" streamed by the first attempt
    sent = _SentText()
    assert [sent.add(_delta(1, 1, "Once")), sent.add(_delta(1, 2, " upon"))] == ["Once", " upon"]

    # when the rerun produces the same text again, then more
    replies = [sent.add(_delta(2, 1, "Once")), sent.add(_delta(2, 2, " upon a")),
               sent.add(_delta(2, 3, " time"))]

    # then only the text past what was sent goes out, and the client holds the rerun's text
    assert replies == ["", " a", " time"]
    assert sent.text == "Once upon a time"


def test_a_rerun_that_differs_from_the_streamed_text_is_refused():
    sent = _SentText()
    sent.add(_delta(1, 2, "Once upon"))

    assert sent.add(_delta(2, 1, "Long ago")) is None


def test_a_rerun_that_diverges_after_catching_up_is_refused():
    sent = _SentText()
    sent.add(_delta(1, 1, "Once"))

    assert sent.add(_delta(2, 1, "On")) == ""
    assert sent.add(_delta(2, 2, "ly")) is None
