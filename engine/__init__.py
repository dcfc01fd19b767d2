"""genq's inference engine: continuous batching over a paged KV cache (vLLM-style API)."""

from engine.config import EngineConfig
from engine.llm import LLM
from engine.llm_engine import EngineStats, LLMEngine
from engine.model_loader import load_tokenizer
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "EngineStats", "SamplingParams", "RequestOutput",
           "CompletionOutput", "load_tokenizer"]
