"""Scheduling, stopping, aborts, priorities, preemption and prefix caching on a tiny model."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from engine import SamplingParams
from tests.engine.conftest import run_to_completion
from tests.engine.test_equivalence import prompts_of_mixed_lengths

GREEDY = dict(temperature=0)


def greedy_outputs(engine, prompts, max_tokens=20, **params):
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=max_tokens, **GREEDY,
                                                          **params))
    outputs = run_to_completion(engine)
    return [outputs[str(i)].outputs[0] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def reference(tiny_engine_factory):
    """Greedy outputs of 6 prompts with plenty of KV room, ignoring EOS."""
    prompts = prompts_of_mixed_lengths(6, seed=3)
    outputs = greedy_outputs(tiny_engine_factory(), prompts, max_tokens=30, ignore_eos=True)
    return prompts, [o.token_ids for o in outputs]


def test_max_tokens_finishes_with_length(tiny_engine_factory, reference):
    prompts, tokens = reference
    outputs = greedy_outputs(tiny_engine_factory(), prompts[:2], max_tokens=5, ignore_eos=True)
    assert [o.token_ids for o in outputs] == [t[:5] for t in tokens[:2]]
    assert {o.finish_reason for o in outputs} == {"length"}


def test_stop_token_id_ends_output_and_is_kept(tiny_engine_factory, reference):
    prompts, tokens = reference
    stop_id = tokens[0][7]
    first = tokens[0].index(stop_id)
    [output] = greedy_outputs(tiny_engine_factory(), prompts[:1], max_tokens=30,
                              stop_token_ids=[stop_id], ignore_eos=True)
    assert output.finish_reason == "stop"
    assert output.token_ids == tokens[0][:first + 1]


def test_min_tokens_suppresses_stop_token_until_reached(tiny_engine_factory, reference):
    prompts, tokens = reference
    stop_id = tokens[0][0]
    [output] = greedy_outputs(tiny_engine_factory(), prompts[:1], max_tokens=10, min_tokens=4,
                              stop_token_ids=[stop_id], ignore_eos=True)
    assert len(output.token_ids) >= 4
    assert stop_id not in output.token_ids[:4]


def test_eos_stops_unless_ignored(tiny_engine_factory, reference):
    prompts, tokens = reference
    engine = tiny_engine_factory()
    engine.eos_token_ids.add(tokens[1][3])
    [stopped] = greedy_outputs(engine, prompts[1:2], max_tokens=30)
    [ignored] = greedy_outputs(engine, prompts[1:2], max_tokens=30, ignore_eos=True)
    assert stopped.finish_reason == "stop" and stopped.token_ids == tokens[1][:4]
    assert ignored.finish_reason == "length" and ignored.token_ids == tokens[1]


def test_stop_string_is_cut_from_text(tiny_engine_factory, reference):
    prompts, tokens = reference
    engine = tiny_engine_factory()
    full_text = engine.tokenizer.decode(tokens[2], skip_special_tokens=True)
    stop = full_text[len(full_text) // 2: len(full_text) // 2 + 3]
    [output] = greedy_outputs(engine, prompts[2:3], max_tokens=30, stop=stop, ignore_eos=True)
    assert output.finish_reason == "stop"
    assert output.text == full_text[:full_text.index(stop)]
    assert stop not in output.text


def test_abort_mid_generation_keeps_partial_output(tiny_engine_factory, reference):
    prompts, tokens = reference
    engine = tiny_engine_factory()
    engine.add_request("a", prompts[0], SamplingParams(max_tokens=30, ignore_eos=True, **GREEDY))
    for _ in range(4):
        assert engine.step() == []
    engine.abort_request("a")
    [output] = engine.step()
    assert output.finished and output.outputs[0].finish_reason == "abort"
    assert 0 < len(output.outputs[0].token_ids) < 30
    assert output.outputs[0].token_ids == tokens[0][:len(output.outputs[0].token_ids)]
    assert not engine.has_unfinished_requests()


def test_lower_priority_number_is_served_first(tiny_engine_factory, reference):
    prompts, _ = reference
    engine = tiny_engine_factory(max_num_seqs=1)
    params = SamplingParams(max_tokens=3, ignore_eos=True, **GREEDY)
    for request_id, priority in [("late-low", 5), ("urgent", 0), ("low-2", 5), ("normal", 1)]:
        engine.add_request(request_id, prompts[0], params, priority=priority)
    order = [output.request_id for output in run_to_completion_ordered(engine)]
    assert order == ["urgent", "normal", "late-low", "low-2"]


def test_a_higher_class_takes_a_seat_from_a_running_lower_class(tiny_engine_factory, reference):
    # Given every seat taken by batch-class requests already generating
    prompts, tokens = reference
    engine = tiny_engine_factory(max_num_seqs=2)
    batch = SamplingParams(max_tokens=30, ignore_eos=True, **GREEDY)
    for i in range(2):
        engine.add_request(f"batch-{i}", prompts[i], batch, priority=5)
    for _ in range(3):
        engine.step()

    # When an interactive request arrives
    engine.add_request("urgent", prompts[2], SamplingParams(max_tokens=2, ignore_eos=True,
                                                            **GREEDY), priority=0)
    finished = run_to_completion_ordered(engine)

    # Then it finishes first, and the preempted request still gives its greedy output
    assert finished[0].request_id == "urgent"
    assert engine.stats.num_preemptions >= 1
    outputs = {output.request_id: output.outputs[0].token_ids for output in finished}
    assert [outputs["batch-0"], outputs["batch-1"]] == tokens[:2]


def run_to_completion_ordered(engine):
    finished = []
    while engine.has_unfinished_requests():
        finished.extend(engine.step())
    return finished


def test_preemption_under_tiny_kv_pool_keeps_greedy_output(tiny_engine_factory, reference):
    prompts, tokens = reference
    longest = max(len(p) for p in prompts) + 30
    engine = tiny_engine_factory(kv_cache_tokens=longest + 48, block_size=16)
    outputs = greedy_outputs(engine, prompts, max_tokens=30, ignore_eos=True)
    assert engine.stats.num_preemptions > 0
    assert [o.token_ids for o in outputs] == tokens


def test_shared_prefix_is_computed_once_and_counted(tiny_engine_factory):
    engine = tiny_engine_factory(block_size=16)
    system = prompts_of_mixed_lengths(1, seed=9)[0][:16] * 4  # 64 tokens = 4 full blocks
    first = greedy_outputs(engine, [system + [5, 6, 7]], max_tokens=4, ignore_eos=True)
    before = engine.stats.prefix_cache_hit_tokens
    second = greedy_outputs(engine, [system + [5, 6, 7]], max_tokens=4, ignore_eos=True)
    assert engine.stats.prefix_cache_hit_tokens - before == 64
    assert second[0].token_ids == first[0].token_ids


def test_chunked_prefill_gives_same_output(tiny_engine_factory, reference):
    prompts, tokens = reference
    engine = tiny_engine_factory(max_num_batched_tokens=7)
    outputs = greedy_outputs(engine, prompts, max_tokens=30, ignore_eos=True)
    assert [o.token_ids for o in outputs] == tokens


def test_seeded_sampling_is_reproducible_across_batch_compositions(tiny_engine_factory):
    prompts = prompts_of_mixed_lengths(5, seed=4)
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=1234,
                            ignore_eos=True)
    alone = tiny_engine_factory()
    alone.add_request("x", prompts[0], params)
    expected = run_to_completion(alone)["x"].outputs[0].token_ids
    crowded = tiny_engine_factory()
    for i, prompt in enumerate(prompts[1:]):
        crowded.add_request(f"other-{i}", prompt, SamplingParams(max_tokens=12, temperature=1.0))
    crowded.add_request("x", prompts[0], params)
    assert run_to_completion(crowded)["x"].outputs[0].token_ids == expected


def test_penalties_and_logprobs_are_applied(tiny_engine_factory, reference):
    prompts, _ = reference
    [output] = greedy_outputs(tiny_engine_factory(), prompts[:1], max_tokens=20,
                              ignore_eos=True, repetition_penalty=1e6, logprobs=2)
    assert len(set(output.token_ids)) == len(output.token_ids)
    assert len(output.logprobs) == 20
    pairs = zip(output.token_ids, output.logprobs, strict=True)
    assert all(token in entry for token, entry in pairs)


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.5), ("max_tokens", 0),
    ("min_tokens", -1), ("repetition_penalty", 0.0), ("presence_penalty", 3.0),
    ("frequency_penalty", -3.0), ("logprobs", -1), ("stop_token_ids", [-1]),
])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_prompt_longer_than_context_is_rejected(tiny_engine_factory):
    engine = tiny_engine_factory()
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("long", [5] * (engine.max_model_len + 1))


def test_duplicate_request_id_is_rejected(tiny_engine_factory):
    engine = tiny_engine_factory()
    engine.add_request("same", [5, 6, 7])
    with pytest.raises(ValueError, match="same"):
        engine.add_request("same", [5, 6, 7])


def test_chat_and_text_prompts_use_the_tokenizer(tiny_engine_factory):
    engine = tiny_engine_factory()
    chat = [{"role": "user", "content": "Hi"}]
    rendered = engine.tokenizer.apply_chat_template(chat, add_generation_prompt=True,
                                                    tokenize=False)
    engine.add_request("chat", chat, SamplingParams(max_tokens=2))
    engine.add_request("text", "Hello world", SamplingParams(max_tokens=2))
    outputs = run_to_completion(engine)
    assert outputs["chat"].prompt_token_ids == engine.tokenizer.encode(
        rendered, add_special_tokens=False)
    assert outputs["text"].num_prompt_tokens == len(engine.tokenizer.encode("Hello world"))
    assert outputs["text"].num_completion_tokens == 2


def test_tokenizing_keeps_the_gil_beside_a_busy_thread(tiny_engine_factory):
    # Given a thread running pure Python and a long switch interval: a call that releases the
    # GIL (as transformers' encode does) waits a whole interval to get it back
    engine = tiny_engine_factory()
    prompts = [f"Write a short story about item {i}." for i in range(20)]
    expected = [engine.tokenizer.encode(prompt) for prompt in prompts]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    busy = threading.Thread(target=spin)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.5)
    busy.start()
    try:
        time.sleep(0.01)  # the busy thread is running
        # When the engine tokenizes 20 prompts
        started = time.perf_counter()
        token_ids = [engine.tokenize(prompt) for prompt in prompts]
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        busy.join()
        sys.setswitchinterval(interval)
    # Then it never handed the GIL over, and the ids are transformers' own
    assert elapsed < 0.25
    assert token_ids == expected


def test_requests_added_from_other_threads_all_finish(tiny_engine_factory):
    engine = tiny_engine_factory()
    params = SamplingParams(max_tokens=4, ignore_eos=True)

    def submit(start: int) -> None:
        for i in range(start, start + 10):
            engine.add_request(str(i), [5 + i, 6, 7], params)

    threads = [threading.Thread(target=submit, args=(n * 10,)) for n in range(3)]
    for thread in threads:
        thread.start()
    finished = {}
    while any(t.is_alive() for t in threads) or engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step()})
    assert sorted(finished, key=int) == [str(i) for i in range(30)]
