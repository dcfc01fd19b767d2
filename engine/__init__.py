"""genq's inference engine: continuous batching over a paged KV cache (vLLM-style API).

The names below load on first use: `from engine import SamplingParams` (a worker's parent
process, the API) costs no torch import (~1.4 s and ~280 MB); `from engine import LLM` does.
"""

from importlib import import_module

_HOMES = {
    "LLM": "engine.llm",
    "LLMEngine": "engine.llm_engine",
    "EngineConfig": "engine.config",
    "EngineStats": "engine.outputs",
    "SamplingParams": "engine.sampling_params",
    "RequestOutput": "engine.outputs",
    "CompletionOutput": "engine.outputs",
    "load_tokenizer": "engine.model_loader",
}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(import_module(_HOMES[name]), name)
    globals()[name] = value  # the next lookup is a plain module attribute
    return value
