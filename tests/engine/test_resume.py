"""A request resumed from an earlier run's partial output (`add_request(resume_from=...)`, as
the worker's engine loop re-runs requests after a failed step): the final output is that
prefix plus the continuation, greedy resumes are token-identical to an uninterrupted run, and
a stream picks up exactly where the earlier run's deltas ended."""

from __future__ import annotations

import pytest

from engine import LLMEngine
from engine.outputs import CompletionOutput
from engine.sampling_params import SamplingParams

from .conftest import run_to_completion

PROMPT = "Once upon a time in a land far"


def run_streamed(engine: LLMEngine, params: SamplingParams, stop_after: int | None = None,
                 resume_from: CompletionOutput | None = None) -> tuple[list, CompletionOutput]:
    """One streamed request: its deltas, and its final output; aborted after `stop_after`
    output tokens when given (the abort's partial output is then the final one)."""
    engine.add_request("s", PROMPT, params, stream=True, resume_from=resume_from)
    deltas, final, num_tokens = [], None, len(resume_from.token_ids) if resume_from else 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                final = output.outputs[0]
                continue
            deltas.append(output.outputs[0])
            num_tokens += len(output.outputs[0].token_ids)
            if num_tokens == stop_after:
                engine.abort_request("s")
    return deltas, final


def test_a_greedy_resumed_stream_matches_an_uninterrupted_run(tiny_engine_factory):
    engine = tiny_engine_factory()
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    # given the output of an uninterrupted greedy run
    engine.add_request("whole", PROMPT, params)
    whole = run_to_completion(engine)["whole"].outputs[0]

    # when the same request is streamed, stopped after 9 tokens, and resumed from its output
    first_deltas, partial = run_streamed(engine, params, stop_after=9)
    assert partial.finish_reason == "abort" and len(partial.token_ids) == 9
    resumed_deltas, final = run_streamed(engine, params, resume_from=partial)

    # then the final output is the uninterrupted one, tokens and text
    assert final.token_ids == whole.token_ids and final.text == whole.text
    assert final.finish_reason == "length"
    # and the resumed deltas continue the first ones: together they are the final output's
    # tokens and the start of its text, never repeating the first run's
    deltas = first_deltas + resumed_deltas
    assert [t for delta in deltas for t in delta.token_ids] == final.token_ids[:23]
    assert [t for delta in resumed_deltas for t in delta.token_ids] == final.token_ids[9:23]
    streamed = "".join(delta.text for delta in deltas)
    assert len(streamed) > len("".join(delta.text for delta in first_deltas))
    assert final.text.startswith(streamed)


def test_a_resumed_stream_keeps_stop_string_text_held_back(tiny_engine_factory):
    engine = tiny_engine_factory()
    # given a stop string from late in a greedy request's text
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    engine.add_request("whole", PROMPT, params)
    full_text = run_to_completion(engine)["whole"].outputs[0].text
    stop = full_text[2 * len(full_text) // 3:][:4]
    stopped = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop])

    # when the request streams with it, stopped after 6 tokens and resumed
    first_deltas, partial = run_streamed(engine, stopped, stop_after=6)
    resumed_deltas, final = run_streamed(engine, stopped, resume_from=partial)

    # then it stops where an uninterrupted run stops, and all deltas together are the start
    # of that text, without the stop string
    assert final.finish_reason == "stop"
    assert final.text == full_text[:full_text.index(stop)]
    streamed = "".join(delta.text for delta in first_deltas + resumed_deltas)
    assert final.text.startswith(streamed) and stop not in streamed


def test_a_resumed_request_outputs_its_prefix_then_the_continuation(tiny_engine_factory):
    engine = tiny_engine_factory()
    # given a prefix of 5 tokens of some other text, with logprobs as a first run gave them
    prefix = engine.tokenize("The quick brown fox jumps")[:5]
    logprobs = [{token: -1.0} for token in prefix]
    partial = CompletionOutput("", prefix, "abort", logprobs=logprobs)

    # when a sampled request with logprobs resumes from it
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True,
                            logprobs=0)
    engine.add_request("r", PROMPT, params, resume_from=partial)
    output = run_to_completion(engine)["r"]
    completion = output.outputs[0]

    # then the prefix counts toward max_tokens and opens the output, text and logprobs alike
    assert len(completion.token_ids) == 12 and completion.token_ids[:5] == prefix
    assert completion.text == engine.tokenizer.decode(completion.token_ids,
                                                      skip_special_tokens=True)
    assert completion.text.startswith(engine.tokenizer.decode(prefix))
    assert completion.logprobs[:5] == logprobs and len(completion.logprobs) == 12
    assert output.prompt_token_ids == engine.tokenize(PROMPT)


def test_a_resume_that_leaves_no_room_is_refused(tiny_engine_factory):
    engine = tiny_engine_factory()
    partial = CompletionOutput("", [5, 6, 7], "abort")
    with pytest.raises(ValueError, match="room"):
        engine.add_request("r", PROMPT, SamplingParams(max_tokens=3), resume_from=partial)
    assert not engine.has_unfinished_requests()
