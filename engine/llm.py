"""LLM: offline batch generation, ``LLM(model).generate(prompts, SamplingParams())``, as vLLM."""

from __future__ import annotations

from tqdm.auto import tqdm

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, Prompt
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = "smollm2-135m", dtype: str = "auto", device: str = "auto",
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 1024,
                 kv_cache_tokens: int | None = None, cache_dir: str | None = None,
                 **config_overrides):
        config = EngineConfig(model=model, dtype=dtype, device=device, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens,
                              kv_cache_tokens=kv_cache_tokens, cache_dir=cache_dir,
                              **config_overrides)
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Prompt | list[Prompt],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Outputs in input order. A single str / token-id list / chat is one prompt."""
        if isinstance(prompts, str) or (prompts and not isinstance(prompts[0], (str, list))):
            prompts = [prompts]
        params = params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params has {len(params)} entries for {len(prompts)} prompts")
        request_ids = [f"generate-{id(self)}-{i}" for i in range(len(prompts))]
        for request_id, prompt, request_params in zip(request_ids, prompts, params, strict=True):
            self.engine.add_request(request_id, prompt, request_params)
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(prompts), disable=not use_tqdm, desc="generate") as progress:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    results[output.request_id] = output
                    progress.update(1)
        return [results[request_id] for request_id in request_ids]
