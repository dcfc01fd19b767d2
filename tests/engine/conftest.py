"""Fixtures for engine tests: tiny random HF models saved to disk, and engines built on them."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from engine import LLMEngine, load_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Engine tests run on the CPU; on a GPU host `GENQ_TEST_DEVICE=cuda` runs them on the GPU (the
# transformers reference models move there too). CI has no GPU.
TEST_DEVICE = os.environ.get("GENQ_TEST_DEVICE", "cpu")

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=512, vocab_size=49152,
            bos_token_id=1, eos_token_id=2, pad_token_id=2)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: loads SmolLM2-135M (seconds to a minute); runs in CI")


def save_random_model(directory, model_type: str, **overrides):
    """A seeded random HF model of ``model_type`` plus the SmolLM2 tokenizer, saved to disk."""
    config = AutoConfig.for_model(model_type, **{**TINY, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(directory)
    load_tokenizer().save_pretrained(directory)
    return model.to(TEST_DEVICE)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    model = save_random_model(directory, "llama", tie_word_embeddings=False)
    return str(directory), model


@pytest.fixture(scope="session")
def tiny_engine_factory(tiny_llama_dir):
    def build(**overrides) -> LLMEngine:
        settings = dict(dtype="float32", device=TEST_DEVICE, kv_cache_tokens=4096)
        return LLMEngine.from_model(tiny_llama_dir[0], **{**settings, **overrides})
    return build


def run_to_completion(engine: LLMEngine) -> dict:
    """step() until idle; finished outputs by request id."""
    outputs = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs[output.request_id] = output
    return outputs
