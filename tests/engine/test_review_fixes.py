"""Regression tests for the engine fixes found in review (issue 22, item 4)."""

from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from engine.block_manager import BlockManager, chain_hash
from engine.sampler import Sampler
from engine.sequence import Sequence
from tests.engine.conftest import run_to_completion

GREEDY = dict(temperature=0, ignore_eos=True)
BLOCK = 16


def greedy_tokens(engine, prompts, max_tokens=4, **params):
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=max_tokens, **GREEDY,
                                                          **params))
    outputs = run_to_completion(engine)
    return [outputs[str(i)].outputs[0].token_ids for i in range(len(prompts))]


# --- prefix-cache keys ---------------------------------------------------------------------

def test_block_keys_differ_where_python_hash_collides():
    # Given token blocks whose Python hashes are equal (int hashes are taken mod 2**61 - 1,
    # and hash(-1) == hash(-2)); a 64-bit key space admits crafted collisions like these
    modulus = 2**61 - 1
    assert hash((None, (5, 6))) == hash((None, (5 + modulus, 6)))
    assert hash((None, (-1,))) == hash((None, (-2,)))

    # Then their block keys differ
    assert chain_hash(None, [5, 6]) != chain_hash(None, [5 + modulus, 6])
    assert chain_hash(None, [-1]) != chain_hash(None, [-2])


def test_block_key_depends_on_the_whole_chain_and_every_token():
    block = list(range(100, 100 + BLOCK))
    first = chain_hash(None, block)
    assert chain_hash(first, block) != chain_hash(chain_hash(None, block[::-1]), block)
    assert chain_hash(None, block) == first  # deterministic across calls and processes
    for i in range(BLOCK):
        changed = block[:i] + [block[i] + 1] + block[i + 1:]
        assert chain_hash(None, changed) != first
    # Token ids are fixed-width: [1, 256] and [256, 1] must not share a byte encoding
    assert chain_hash(None, [1, 256]) != chain_hash(None, [256, 1])
    assert len(first) == 32


def cached_manager(token_ids: list[int]) -> BlockManager:
    """A manager in which ``token_ids`` were computed and their full blocks registered."""
    manager = BlockManager(num_blocks=16, block_size=BLOCK)
    seq = Sequence("cached", token_ids, SamplingParams())
    manager.allocate(seq)
    seq.num_computed_tokens = len(seq)
    manager.cache_full_blocks(seq)
    manager.deallocate(seq)
    return manager


def test_only_an_identical_block_aligned_prefix_hits_the_cache():
    first, second, tail = [7] * BLOCK, list(range(200, 200 + BLOCK)), [1, 2, 3]
    manager = cached_manager(first + second + tail)

    same_prefix = Sequence("same", first + second + [9], SamplingParams())
    manager.allocate(same_prefix)
    assert same_prefix.num_computed_tokens == 2 * BLOCK

    # The same second block after a different first one is a miss: its key chains the first
    other_first = Sequence("other", [8] * BLOCK + second + [9], SamplingParams())
    manager.allocate(other_first)
    assert other_first.num_computed_tokens == 0


def test_engine_reuses_a_shared_system_prompt_but_not_a_different_one(tiny_engine_factory):
    engine = tiny_engine_factory(block_size=BLOCK)
    system = list(range(300, 300 + 2 * BLOCK))
    [alone] = greedy_tokens(engine, [system + [11, 12]])
    before = engine.stats.prefix_cache_hit_tokens
    [shared] = greedy_tokens(engine, [system + [11, 12]])
    assert engine.stats.prefix_cache_hit_tokens - before == 2 * BLOCK
    assert shared == alone

    before = engine.stats.prefix_cache_hit_tokens
    greedy_tokens(engine, [[301] + system[1:] + [11, 12]])
    assert engine.stats.prefix_cache_hit_tokens == before


# --- KV-block preemption for a higher class ------------------------------------------------

BATCH_PROMPTS = [list(range(1000, 1040)), list(range(2000, 2040))]  # 3 blocks each


def engine_full_of_batch_sequences(tiny_engine_factory):
    """Two batch-class (priority 5) sequences decoding in a pool of 6 blocks, all taken."""
    engine = tiny_engine_factory(block_size=BLOCK, kv_cache_tokens=6 * BLOCK)
    batch = SamplingParams(max_tokens=8, **GREEDY)
    for i, prompt in enumerate(BATCH_PROMPTS):
        engine.add_request(f"batch-{i}", prompt, batch, priority=5)
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks == 0
    assert engine.stats.num_running == 2
    return engine


def test_an_urgent_request_preempts_batch_sequences_when_blocks_run_out(tiny_engine_factory):
    reference = greedy_tokens(tiny_engine_factory(), BATCH_PROMPTS, max_tokens=8)
    # Given a KV pool full of batch-class sequences
    engine = engine_full_of_batch_sequences(tiny_engine_factory)

    # When an interactive request arrives
    engine.add_request("urgent", list(range(3000, 3010)),
                       SamplingParams(max_tokens=2, **GREEDY), priority=0)
    engine.step()

    # Then it runs at the next step, by preempting one batch sequence (the newest)
    assert engine.stats.num_preemptions == 1
    running = {seq.request_id for seq in engine.scheduler.running}
    assert running == {"batch-0", "urgent"}
    outputs = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs.setdefault("order", []).append(output.request_id)
            outputs[output.request_id] = output.outputs[0].token_ids
    assert outputs["order"][0] == "urgent"
    assert [outputs["batch-0"], outputs["batch-1"]] == reference


def test_an_equal_class_request_waits_for_blocks_without_preempting(tiny_engine_factory):
    engine = engine_full_of_batch_sequences(tiny_engine_factory)
    engine.add_request("same-class", list(range(3000, 3010)),
                       SamplingParams(max_tokens=2, **GREEDY), priority=5)
    engine.step()
    assert engine.stats.num_preemptions == 0
    assert engine.stats.num_waiting == 1
    outputs = run_to_completion(engine)
    assert engine.stats.num_preemptions == 0
    assert set(outputs) == {"batch-0", "batch-1", "same-class"}


# --- incremental stop strings ---------------------------------------------------------------

def stop_by_full_decode(tokenizer, tokens, stops, min_tokens=0):
    """(tokens kept, text) as the old engine found them: the whole output decoded each step."""
    window = max(len(stop) for stop in stops) + 16
    for count in range(max(1, min_tokens), len(tokens) + 1):
        text = tokenizer.decode(tokens[:count], skip_special_tokens=True)
        hits = [i for stop in stops if (i := text.find(stop, max(0, len(text) - window))) != -1]
        if hits:
            return tokens[:count], text[:min(hits)]
    return tokens, tokenizer.decode(tokens, skip_special_tokens=True)


def test_incremental_stop_strings_match_full_decoding(tiny_engine_factory):
    engine = tiny_engine_factory()
    prompts = [list(range(4000 + 97 * i, 4000 + 97 * i + 9)) for i in range(3)]
    references = greedy_tokens(engine, prompts, max_tokens=30)
    cases = []  # (prompt, stops, min_tokens), stops cut from the reference text across tokens
    for prompt, tokens in zip(prompts, references, strict=True):
        text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
        middle = len(text) // 2
        cases += [(prompt, [text[middle:middle + 5]], 0),
                  (prompt, ["\x00absent", text[middle + 3:middle + 4]], 0),
                  (prompt, [text[2:9]], 12)]  # met before min_tokens: a later match counts
    for i, (prompt, stops, min_tokens) in enumerate(cases):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=30, stop=stops,
                                                          min_tokens=min_tokens, **GREEDY))
    outputs = run_to_completion(engine)
    assert sum(o.outputs[0].finish_reason == "stop" for o in outputs.values()) >= len(cases) // 2
    for i, (prompt, stops, min_tokens) in enumerate(cases):
        tokens = references[prompts.index(prompt)]
        expected_tokens, expected_text = stop_by_full_decode(engine.tokenizer, tokens, stops,
                                                             min_tokens)
        output = outputs[str(i)].outputs[0]
        assert (output.token_ids, output.text) == (expected_tokens, expected_text), (i, stops)
        assert output.finish_reason == ("stop" if expected_tokens != tokens else "length")


def test_stop_string_checks_decode_a_bounded_window_per_token(tiny_engine_factory):
    # Given a long output that never meets its stop string
    engine = tiny_engine_factory()
    decoded_ids = []
    decode = engine.tokenizer.decode

    def counting_decode(token_ids, **kwargs):
        decoded_ids.append(len(token_ids))
        return decode(token_ids, **kwargs)

    engine.tokenizer.decode = counting_decode
    num_tokens = 120
    engine.add_request("long", list(range(5000, 5010)),
                       SamplingParams(max_tokens=num_tokens, stop="\x00never", **GREEDY))
    run_to_completion(engine)

    # Then each step decoded a few tokens, however long the output already was
    # (the final text is decoded once, whole)
    per_step = decoded_ids[:-1]
    assert decoded_ids[-1] == num_tokens
    assert max(per_step) <= 8
    assert sum(per_step) <= 4 * num_tokens


# --- bounded top-k / top-p ------------------------------------------------------------------

VOCAB = 49152


def full_sort_sample(logits, params, uniform):
    """The old sampler's draw for filtered rows: sort the whole vocabulary, filter, draw."""
    logits = logits / torch.tensor([p.temperature for p in params]).unsqueeze(1)
    top_k = torch.tensor([p.top_k if p.top_k > 0 else VOCAB for p in params])
    top_p = torch.tensor([p.top_p for p in params])
    min_p = torch.tensor([p.min_p for p in params])
    logits, order = logits.sort(dim=-1, descending=True)
    logits = logits.masked_fill(torch.arange(VOCAB) >= top_k.unsqueeze(1), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    before = probs.cumsum(dim=-1) - probs
    drop = (before > top_p.unsqueeze(1)) | (probs < min_p.unsqueeze(1) * probs[:, :1])
    drop[:, 0] = False
    cdf = torch.softmax(logits.masked_fill(drop, float("-inf")), dim=-1).cumsum(dim=-1)
    picks = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(1)).clamp_(max=VOCAB - 1)
    return order.gather(1, picks).squeeze(1).tolist()


def seeded_rows(params, seed):
    return [Sequence(str(i), [1], p, generator=torch.Generator().manual_seed(seed * 100 + i))
            for i, p in enumerate(params)]


def peaked_logits(rows, seed):
    """Logits shaped like a trained model's: a few strong candidates above a long flat tail."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, VOCAB, generator=generator) * 2
    logits[:, :64] += torch.rand(rows, 64, generator=generator) * 12
    return logits


FILTERS = [dict(temperature=0.8, top_k=50), dict(temperature=0.8, top_k=50, top_p=0.9),
           dict(temperature=1.0, top_p=0.9), dict(temperature=0.7, min_p=0.05),
           dict(temperature=1.0, top_k=3000, top_p=0.95), dict(temperature=1.0, top_k=10**6)]


@pytest.mark.parametrize("params", FILTERS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()
                                                                 if k != "temperature"))
def test_bounded_filters_draw_what_a_full_sort_drew(params):
    sampler = Sampler(set())
    for seed in range(4):
        logits = peaked_logits(16, seed)
        batch = [SamplingParams(**params)] * 16
        uniform = torch.cat([torch.rand(1, generator=seq.generator)
                             for seq in seeded_rows(batch, seed)])
        expected = full_sort_sample(logits, batch, uniform)
        tokens, _ = sampler.sample(logits.clone(), seeded_rows(batch, seed))
        assert tokens == expected


def test_top_k_and_a_peaked_top_p_do_not_sort_the_vocabulary():
    params = [SamplingParams(temperature=0.8, top_k=50, top_p=0.9),
              SamplingParams(temperature=1.0, top_p=0.9)] * 8
    with torch.profiler.profile() as profile:
        Sampler(set()).sample(peaked_logits(16, 0), seeded_rows(params, 0))
    assert "aten::sort" not in {event.key for event in profile.key_averages()}


def test_an_unfiltered_row_draws_the_same_beside_filtered_rows():
    logits = peaked_logits(2, 5)
    plain = SamplingParams(temperature=1.0)
    [alone], _ = Sampler(set()).sample(logits[:1].clone(), seeded_rows([plain], 1))
    beside, _ = Sampler(set()).sample(logits.clone(),
                                      seeded_rows([plain, SamplingParams(top_k=5)], 1))
    assert beside[0] == alone
