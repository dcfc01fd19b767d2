"""Perplexity of a text under an engine's model: the check that a quantized path stays close to
the full-precision one (tests/engine/test_quantization.py, benchmarks.engine_throughput)."""

from __future__ import annotations

import math

import torch

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


@torch.inference_mode()
def perplexity(engine: LLMEngine, text: str) -> float:
    """exp(mean negative log-likelihood) of each token given the ones before, in one forward.

    Needs an idle engine: the text borrows KV blocks from its pool for the one forward.
    """
    token_ids = engine.tokenize(text)
    seq = Sequence("perplexity", token_ids, SamplingParams())
    runner, blocks = engine.runner, engine.block_manager
    if engine.has_unfinished_requests() or not blocks.can_allocate(seq):
        raise RuntimeError("perplexity needs an idle engine with room for the whole text")
    blocks.allocate(seq)
    try:
        seq.num_computed_tokens = 0  # score every token, even a cached prefix
        input_ids, meta, _, _ = runner.prepare([(seq, len(token_ids))])
        every_row = torch.arange(len(token_ids), device=input_ids.device)
        logits = runner.model.forward(input_ids, meta, runner.kv_cache, every_row)
    finally:
        blocks.deallocate(seq)
    log_probs = torch.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(token_ids[1:], device=log_probs.device)
    nll = -log_probs.gather(1, targets.unsqueeze(1)).mean().item()
    return math.exp(nll)
