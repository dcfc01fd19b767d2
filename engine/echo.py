"""EchoEngine: the LLMEngine interface with no model; a request "generates" its own prompt
tokens back at once. For measuring the job system's overhead (benchmarks.queue_overhead) and
for tests that need many jobs finished fast. Select it with the model name "echo"."""

from __future__ import annotations

import threading

from engine.model_loader import load_tokenizer
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

ECHO_MODEL = "echo"
ECHO_MAX_MODEL_LEN = 8192


class EchoEngine:
    def __init__(self, cache_dir: str | None = None) -> None:
        self.tokenizer = load_tokenizer(ECHO_MODEL, cache_dir=cache_dir)
        self.max_model_len = ECHO_MAX_MODEL_LEN
        self._lock = threading.Lock()
        self._live: dict[str, RequestOutput] = {}

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    priority: int = 0, stream: bool = False,
                    resume_from: CompletionOutput | None = None) -> None:
        """`stream` and `resume_from` change nothing: an echoed request finishes at its first
        step, and an echo continues any part of itself into the same echo."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        elif prompt and isinstance(prompt[0], dict):
            token_ids = self.tokenizer.encode(prompt[-1]["content"])
        else:
            token_ids = list(prompt)
        echoed = token_ids[: params.max_tokens]
        completion = CompletionOutput(
            text=self.tokenizer.decode(echoed), token_ids=echoed,
            finish_reason="length" if len(echoed) == params.max_tokens else "stop",
        )
        with self._lock:
            if request_id in self._live:
                raise ValueError(f"request_id {request_id!r} is already in the engine")
            self._live[request_id] = RequestOutput(request_id, token_ids, [completion])

    def abort_request(self, request_id: str) -> None:
        with self._lock:
            output = self._live.get(request_id)
            if output is not None:
                output.outputs[0].finish_reason = "abort"

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self._live)

    def step(self) -> list[RequestOutput]:
        with self._lock:
            finished, self._live = list(self._live.values()), {}
        return finished
