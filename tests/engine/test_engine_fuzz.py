"""Extreme sampling parameters: refused at construction, or run without touching neighbours."""

from __future__ import annotations

import math

import pytest

from engine import SamplingParams
from tests.engine.conftest import run_to_completion

MAX_TOKENS = 6
NEIGHBOURS = {
    "greedy": SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
    "seeded": SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_k=40, top_p=0.9,
                             seed=7, ignore_eos=True),
    "plain": SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=8, ignore_eos=True),
}
PROMPTS = {"greedy": list(range(600, 620)), "seeded": list(range(700, 705)),
           "plain": list(range(800, 833))}


@pytest.mark.parametrize("field, value", [
    ("seed", -10**26), ("seed", 2**64), ("seed", 1.5), ("top_k", 1.5), ("top_k", -10**30),
    ("max_tokens", 10.0), ("temperature", math.inf), ("temperature", math.nan),
    ("temperature", "hot"), ("top_p", math.nan), ("min_p", math.inf),
    ("repetition_penalty", math.inf), ("repetition_penalty", 1e-30),
    ("repetition_penalty", math.nan), ("presence_penalty", math.nan),
    ("frequency_penalty", -math.inf), ("logprobs", 10**6), ("logprobs", 2.0),
    ("stop", ["x"] * 17), ("stop", ["x" * 1025]), ("stop", [3]), ("stop", 3),
    ("stop_token_ids", list(range(65))), ("stop_token_ids", [1.0]), ("stop_token_ids", 5),
    ("min_tokens", 10**30),
])
def test_an_extreme_value_is_refused_with_its_field_named(field, value):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**{field: value})


EXTREMES = {
    "top_k_huge": dict(top_k=10**30, temperature=1.0),
    "seed_lowest": dict(seed=-(2**63)),
    "seed_highest": dict(seed=2**64 - 1),
    "tiny_temperature": dict(temperature=1e-30),
    "huge_temperature": dict(temperature=1e30, top_p=0.5),
    "tiny_top_p": dict(top_p=1e-12, top_k=1),
    "min_p_one": dict(min_p=1.0),
    "strong_penalties": dict(repetition_penalty=1e6, presence_penalty=2, frequency_penalty=-2),
    "weak_repetition": dict(repetition_penalty=1e-2, temperature=0.5),
    "max_logprobs": dict(logprobs=20, top_k=10**9),
    "long_stops": dict(stop=[chr(0x4E00 + i) * 1024 for i in range(16)]),
    "stop_ids_past_vocab": dict(stop_token_ids=[2**63 + 5, 10**30, 49151, 0],
                                min_tokens=MAX_TOKENS),
}


def run_neighbours(engine, extreme: dict | None) -> tuple[dict, int]:
    for request_id, params in NEIGHBOURS.items():
        engine.add_request(request_id, PROMPTS[request_id], params)
    if extreme is not None:
        settings = dict(max_tokens=MAX_TOKENS, ignore_eos=True) | extreme
        engine.add_request("extreme", list(range(900, 911)), SamplingParams(**settings))
    steps_before = engine.stats.num_steps
    outputs = run_to_completion(engine)
    return outputs, engine.stats.num_steps - steps_before


@pytest.fixture(scope="module")
def engine(tiny_engine_factory):
    # Without prefix caching every run computes its prompts the same way.
    return tiny_engine_factory(enable_prefix_caching=False)


@pytest.fixture(scope="module")
def alone(engine):
    outputs, steps = run_neighbours(engine, None)
    return {rid: o.outputs[0].token_ids for rid, o in outputs.items()}, steps


@pytest.mark.parametrize("name", EXTREMES)
def test_an_extreme_request_leaves_its_neighbours_untouched(engine, alone, name):
    # Given the neighbours' outputs (and step count) when they run alone
    expected, steps_alone = alone

    # When one request with extreme but accepted values shares their steps
    outputs, steps = run_neighbours(engine, EXTREMES[name])

    # Then every request finishes, the neighbours' tokens are the same, in as many steps
    assert set(outputs) == set(NEIGHBOURS) | {"extreme"}
    assert {rid: outputs[rid].outputs[0].token_ids for rid in NEIGHBOURS} == expected
    assert steps == steps_alone
    extreme = outputs["extreme"].outputs[0]
    assert 1 <= len(extreme.token_ids) and all(0 <= t < 49152 for t in extreme.token_ids)


@pytest.mark.parametrize("bad_ids", [[5, -1, 7], [5, 49152], [5, 2**63], [5, 2.0]])
def test_a_prompt_with_token_ids_outside_the_vocabulary_is_refused(engine, bad_ids):
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("bad-ids", bad_ids, SamplingParams(max_tokens=2))
    assert not engine.has_unfinished_requests()
