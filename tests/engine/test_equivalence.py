"""Greedy decoding matches transformers.generate token for token in fp32."""

from __future__ import annotations

import pytest
import torch

from engine import LLMEngine, SamplingParams
from tests.engine.conftest import TEST_DEVICE, run_to_completion, save_random_model


def prompts_of_mixed_lengths(count: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 90, (count,), generator=generator).tolist()
    return [torch.randint(3, 49152, (n,), generator=generator).tolist() for n in lengths]


def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt], device=model.device),
                                max_new_tokens=num_tokens, min_new_tokens=num_tokens,
                                do_sample=False)
    return output[0, len(prompt):].tolist()


def assert_matches_hf(engine: LLMEngine, model, prompts: list[list[int]], num_tokens: int):
    params = SamplingParams(temperature=0, max_tokens=num_tokens, min_tokens=num_tokens)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    outputs = run_to_completion(engine)
    for i, prompt in enumerate(prompts):
        assert outputs[str(i)].outputs[0].token_ids == hf_greedy(model, prompt, num_tokens), i


def test_tiny_llama_greedy_matches_transformers_in_one_batch(tiny_llama_dir):
    directory, model = tiny_llama_dir
    engine = LLMEngine.from_model(directory, dtype="float32", device=TEST_DEVICE,
                                  max_num_batched_tokens=128, kv_cache_tokens=4096)
    assert_matches_hf(engine, model, prompts_of_mixed_lengths(8), num_tokens=24)


@pytest.mark.parametrize("model_type, overrides", [
    ("qwen2", dict(tie_word_embeddings=True)),
    ("qwen3", dict(tie_word_embeddings=True, head_dim=16)),
    ("mistral", dict(tie_word_embeddings=False)),
])
def test_other_families_greedy_match_transformers(tmp_path, model_type, overrides):
    model = save_random_model(tmp_path, model_type, **overrides)
    engine = LLMEngine.from_model(str(tmp_path), dtype="float32", device=TEST_DEVICE,
                                  max_num_batched_tokens=64, kv_cache_tokens=2048)
    assert_matches_hf(engine, model, prompts_of_mixed_lengths(4, seed=1), num_tokens=16)
