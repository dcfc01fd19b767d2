"""RequestOutput and CompletionOutput: what the engine hands back (vLLM shapes); EngineStats:
its counters. Torch-free, like engine.sampling_params: a worker's parent process uses them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort"
    logprobs: list[dict[int, float]] | None = None  # per token: itself first, then the top ones
    index: int = 0
    token_texts: dict[int, str] | None = None  # with logprobs: each token id's text


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(output.token_ids) for output in self.outputs)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_preemptions: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    kv_cache_usage: float  # fraction of KV blocks held by live sequences
    num_prompt_tokens: int  # over all finished-or-running requests added so far
    num_generated_tokens: int
    num_steps: int  # forward passes run; num_generated_tokens / num_steps is the mean batch
