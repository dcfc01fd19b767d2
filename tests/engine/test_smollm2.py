"""SmolLM2-135M (the bundled GGUF): greedy parity with transformers and the offline LLM API."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.model_loader import BUNDLED_MODEL, default_cache_dir

pytestmark = pytest.mark.slow

PROMPTS = [
    "Hi", "The capital of France is", "def fibonacci(n):",
    "Write a haiku about the sea.", "List three prime numbers:", "Once upon a time,",
    "Explain what a hash table is in one sentence.", "1, 2, 3, 4,",
    "Translate 'good morning' to Spanish:", "The quick brown fox",
    "Q: What is the boiling point of water at sea level?\nA:",
    "A long prompt about queues. " * 12, "import numpy as np\n",
    "My favourite colour is", "Summarise: continuous batching lets new requests join " * 4,
    "Why is the sky blue?",
]


@pytest.fixture(scope="module")
def llm_fp32():
    return LLM(BUNDLED_MODEL, dtype="float32", device="cpu", kv_cache_tokens=8192)


def test_greedy_matches_transformers_on_16_mixed_prompts_in_one_batch(llm_fp32):
    num_tokens = 20
    params = SamplingParams(temperature=0, max_tokens=num_tokens, min_tokens=num_tokens)
    outputs = llm_fp32.generate(PROMPTS, params, use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(default_cache_dir(), BUNDLED_MODEL),
                                              dtype=torch.float32).eval()
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        ids = torch.tensor([output.prompt_token_ids])
        with torch.no_grad():
            expected = hf.generate(ids, max_new_tokens=num_tokens, min_new_tokens=num_tokens,
                                   do_sample=False)[0, ids.shape[1]:].tolist()
        assert output.outputs[0].token_ids == expected, prompt


def test_chat_prompt_gives_sensible_text_in_bf16():
    llm = LLM(BUNDLED_MODEL, dtype="bfloat16", device="cpu", kv_cache_tokens=4096)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    [output] = llm.generate([chat], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert "Paris" in output.outputs[0].text
    assert output.outputs[0].finish_reason in ("stop", "length")
