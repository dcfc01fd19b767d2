"""The engine's CUDA path: device and dtype choice, the KV pool in GPU memory, CPU/GPU agreement.

These run only where torch sees a GPU; CI has none, so there they are skipped (reported by -ra).
On a GPU host, `GENQ_TEST_DEVICE=cuda pytest tests/engine -m "not slow"` also runs every other
engine test (scheduling, preemption, aborts, sampling, equivalence with transformers) on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, EngineConfig, LLMEngine, SamplingParams
from tests.engine.conftest import run_to_completion
from tests.engine.test_equivalence import prompts_of_mixed_lengths

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (none in CI): run on a GPU host")


def test_auto_picks_cuda_and_bf16():
    config = EngineConfig(model="dummy:tiny-llama")
    assert (config.device, config.dtype) == ("cuda", torch.bfloat16)


def test_kv_pool_and_weights_live_in_gpu_memory():
    engine = LLMEngine.from_model("dummy:smollm2-135m", device="cuda")
    assert engine.runner.kv_cache.device.type == "cuda"
    assert engine.runner.model.embed.device.type == "cuda"
    # Sized from free GPU memory: the default wants max_num_seqs * 1024 tokens, which fit.
    assert engine.runner.num_slots == engine.config.max_num_seqs * 1024


def test_greedy_fp32_on_cuda_matches_the_cpu(tiny_llama_dir):
    prompts = prompts_of_mixed_lengths(8, seed=5)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    tokens = {}
    for device in ("cpu", "cuda"):
        engine = LLMEngine.from_model(tiny_llama_dir[0], dtype="float32", device=device,
                                      max_num_batched_tokens=128, kv_cache_tokens=4096)
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params)
        outputs = run_to_completion(engine)
        tokens[device] = [outputs[str(i)].outputs[0].token_ids for i in range(len(prompts))]
    assert tokens["cuda"] == tokens["cpu"]


def test_bf16_smollm2_shapes_generate_and_seeded_sampling_repeats():
    llm = LLM("dummy:smollm2-135m", device="cuda", max_num_seqs=16)
    prompts = [f"Tell me about item {i}." for i in range(40)]  # more than the seats
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=32, ignore_eos=True)
    first = llm.generate(prompts, params, use_tqdm=False)
    again = llm.generate(prompts, params, use_tqdm=False)
    assert all(o.num_completion_tokens == 32 for o in first)
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in again]
