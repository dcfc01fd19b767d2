"""Streamed requests: each step reports the new text and token ids, and the deltas add up to
the final output (also when a stop string cuts it)."""

from __future__ import annotations

from engine import LLMEngine
from engine.sampling_params import SamplingParams

PROMPTS = ["The quick brown fox", "Once upon a time in a land far"]


def stream(engine: LLMEngine, prompt: str, **params) -> tuple[list, object]:
    """Run one streamed request to its end: its deltas in order, and its final output."""
    engine.add_request("s", prompt, SamplingParams(temperature=0.0, **params), stream=True)
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                final = output
            else:
                deltas.append(output.outputs[0])
    return deltas, final


def test_streamed_deltas_join_to_the_final_text_and_tokens(tiny_engine_factory):
    engine = tiny_engine_factory()
    for prompt in PROMPTS:
        # given a streamed request that runs to max_tokens
        # when the engine steps it to the end
        deltas, final = stream(engine, prompt, max_tokens=20, ignore_eos=True)
        # then one delta a step until the last token, and the deltas are a prefix of the output
        completion = final.outputs[0]
        assert len(deltas) == 19
        assert all(len(delta.token_ids) == 1 for delta in deltas)
        assert [t for d in deltas for t in d.token_ids] == completion.token_ids[:19]
        streamed = "".join(delta.text for delta in deltas)
        assert streamed and completion.text.startswith(streamed)
        assert streamed == engine.tokenizer.decode(completion.token_ids[:19])[:len(streamed)]


def test_deltas_never_show_a_stop_string(tiny_engine_factory):
    # given the text a request generates without stop strings
    engine = tiny_engine_factory()
    _, unstopped = stream(engine, PROMPTS[1], max_tokens=30, ignore_eos=True)
    full_text = unstopped.outputs[0].text
    stop = full_text[len(full_text) // 2: len(full_text) // 2 + 3]
    # when it is streamed again with a stop string from the middle of that text
    deltas, final = stream(engine, PROMPTS[1], max_tokens=30, ignore_eos=True, stop=stop)
    # then the deltas stop short of the stop string, and the final text continues them
    streamed = "".join(delta.text for delta in deltas)
    assert final.outputs[0].text == full_text[:full_text.index(stop)]
    assert final.outputs[0].text.startswith(streamed)
    assert stop not in streamed


def test_unstreamed_requests_get_no_deltas(tiny_engine_factory):
    # given a request added without `stream`
    engine = tiny_engine_factory()
    engine.add_request("r", PROMPTS[0], SamplingParams(max_tokens=5, ignore_eos=True))
    # when it runs to the end, then every step returns only finished outputs
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert [output.finished for output in outputs] == [True]
