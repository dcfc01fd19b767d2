"""LLMEngine: the online API (add_request / step / abort_request) around scheduler and runner.

Thread-safety: ``add_request``, ``abort_request``, ``has_unfinished_requests`` and ``stats`` may
be called from any thread; requests and aborts go into a lock-protected inbox that ``step()``
drains before scheduling. ``step()`` itself must be called from one thread at a time (one
engine-loop thread): it owns the scheduler, the KV cache and the model.
"""

from __future__ import annotations

import os
import random
import threading

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.model_loader import load_model
from engine.model_runner import ModelRunner
from engine.models.llama import LlamaForCausalLM
from engine.outputs import CompletionOutput, EngineStats, RequestOutput
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence

Prompt = str | list[int] | list[dict]


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.device == "cpu":
            torch.set_num_threads(config.num_threads or _usable_cpus())
        hf_config, state_dict, self.tokenizer = load_model(config.model, config.cache_dir,
                                                           config.seed)
        # transformers' `encode` runs the Rust tokenizer through `encode_batch`, which releases
        # the GIL. On a worker's engine-loop thread every release cost up to a switch interval
        # (5 ms) whenever another thread was running Python: 0.9 s of wall time (0.15 s of CPU)
        # in a 45 s run of 1000 prompts (benchmarks.queue_overhead, Zen 4). The backend's own
        # `encode` keeps the GIL, gives the same ids and costs half the CPU.
        self._backend_tokenizer = getattr(self.tokenizer, "backend_tokenizer", None)
        model = LlamaForCausalLM(hf_config, state_dict, config.dtype, config.device,
                                 config.quantization, config.max_quantized_rows,
                                 config.head_quantization, config.activation_quantization)
        del state_dict
        self.max_model_len = model.max_model_len
        self.eos_token_ids = _eos_token_ids(hf_config, self.tokenizer)
        self.runner = ModelRunner(config, model, Sampler(self.eos_token_ids))
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self._seed_source = random.Random(config.seed)
        self._lock = threading.Lock()
        self._inbox: list[Sequence] = []
        self._abort_inbox: list[str] = []
        self._live: dict[str, Sequence] = {}  # every request added and not yet returned
        self._num_prompt_tokens = 0
        self._num_generated_tokens = 0
        self._num_steps = 0
        self._warm_up()

    def _warm_up(self) -> None:
        """One short request through every path (prefill, decode, sampling) before the first
        user's: the kernels' one-time set-up (oneDNN primitives, the paged decode kernel's
        build) lands here, at start, not on a request. Leaves the counters at zero."""
        length = max(1, min(self.config.block_size + 1, self.runner.num_slots - 2))
        # A fixed seed: the warm-up must not draw from the engine's seed source.
        self.add_request("genq-warm-up", list(range(1, length + 1)),
                         SamplingParams(max_tokens=2, ignore_eos=True, seed=0))
        while self.has_unfinished_requests():
            self.step()
        self._num_prompt_tokens = self._num_generated_tokens = self._num_steps = 0
        self.block_manager.num_prefix_query_tokens = 0
        self.block_manager.num_prefix_hit_tokens = 0

    @classmethod
    def from_model(cls, model: str, **overrides) -> LLMEngine:
        return cls(EngineConfig(model=model, **overrides))

    def tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self._encode(prompt, add_special_tokens=True)
        if prompt and isinstance(prompt[0], dict):
            rendered = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                                          tokenize=False)
            return self._encode(rendered, add_special_tokens=False)
        return list(prompt)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self._backend_tokenizer is None:  # a slow (pure Python) tokenizer
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return self._backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None,
                    priority: int = 0, stream: bool = False,
                    resume_from: CompletionOutput | None = None) -> None:
        """Queue a request; raises ValueError for a duplicate id or a prompt that cannot fit.
        A `stream` request also gets an unfinished RequestOutput from every step() that gives it
        new tokens: the delta (new text and token ids) since the previous one.
        `resume_from`: the partial output of an earlier run of this request (an abort's); its
        tokens count as generated already (max_tokens, penalties, stops, the final output) and
        a stream reports only what comes after them."""
        params = params or SamplingParams()
        token_ids = self.tokenize(prompt)
        if not token_ids:
            raise ValueError("prompt must not be empty")
        vocab = self.runner.model.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in token_ids):
            # One bad id would break the forward of every request batched with it.
            raise ValueError(f"prompt token ids must be ints in [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt is {len(token_ids)} tokens, longer than the model's "
                             f"context (max_model_len={self.max_model_len}) allows")
        worst_case = min(len(token_ids) + params.max_tokens, self.max_model_len)
        capacity = self.runner.num_slots
        if worst_case > capacity:
            raise ValueError(f"prompt + max_tokens needs {worst_case} KV-cache tokens but the "
                             f"pool holds {capacity} (raise kv_cache_tokens)")
        generator = torch.Generator()
        seq = Sequence(request_id, token_ids, params, priority, generator, stream)
        if resume_from is not None:
            self._resume(seq, resume_from)
        seed = params.seed
        with self._lock:
            if request_id in self._live:
                raise ValueError(f"request_id {request_id!r} is already in the engine")
            if seed is None:
                seed = self._seed_source.getrandbits(63)
            generator.manual_seed(seed)
            self._live[request_id] = seq
            self._inbox.append(seq)

    def _resume(self, seq: Sequence, partial: CompletionOutput) -> None:
        """Take `partial`'s tokens as ``seq``'s first output tokens, in the state the earlier
        run left them: its text decoded token by token as that run did, and (streamed) counted
        as reported, held-back text excepted, so the next delta starts where its last ended."""
        params, vocab = seq.params, self.runner.model.vocab_size
        if len(partial.token_ids) >= params.max_tokens or (
                seq.num_prompt_tokens + len(partial.token_ids) >= self.max_model_len):
            raise ValueError("a resumed output must leave room for one more token")
        if not all(isinstance(t, int) and 0 <= t < vocab for t in partial.token_ids):
            raise ValueError(f"resumed token ids must be ints in [0, {vocab})")
        if seq.logprobs is not None:
            if partial.logprobs is None or len(partial.logprobs) != len(partial.token_ids):
                raise ValueError("a resumed output needs the logprobs of its tokens")
            seq.logprobs = list(partial.logprobs)
        for token_id in partial.token_ids:
            seq.token_ids.append(token_id)
            if params.stop or seq.stream:
                self._decode_new_text(seq)
        if seq.stream:
            seq.num_streamed_chars = max(0, len(seq.output_text) - _num_held_back_chars(params))
            seq.num_streamed_tokens = seq.num_output_tokens

    def abort_request(self, request_id: str) -> None:
        """The request finishes with reason "abort" (partial output kept) at the next step()."""
        with self._lock:
            if request_id in self._live:
                self._abort_inbox.append(request_id)

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self._live)

    @property
    def stats(self) -> EngineStats:
        manager = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queried_tokens=manager.num_prefix_query_tokens,
            prefix_cache_hit_tokens=manager.num_prefix_hit_tokens,
            kv_cache_usage=manager.usage, num_prompt_tokens=self._num_prompt_tokens,
            num_generated_tokens=self._num_generated_tokens, num_steps=self._num_steps)

    def step(self) -> list[RequestOutput]:
        """One engine iteration: schedule -> run -> postprocess. Returns finished requests, then
        the deltas of unfinished streamed ones (`finished=False`)."""
        finished = self._drain_inbox()
        deltas: list[RequestOutput] = []
        scheduled = self.scheduler.schedule()
        if scheduled:
            seqs, token_ids, logprobs = self.runner.run(scheduled)
            self._num_steps += 1
            for seq, num_tokens in scheduled:
                seq.num_computed_tokens += num_tokens
                self.block_manager.cache_full_blocks(seq)
            for seq, token_id, logprob in zip(seqs, token_ids, logprobs, strict=True):
                if self._append_token(seq, token_id, logprob):
                    finished.append(seq)
                elif seq.stream:
                    deltas.append(self._delta_output(seq))
        return [*(self._finish_output(seq) for seq in finished), *deltas]

    def _drain_inbox(self) -> list[Sequence]:
        with self._lock:
            new, self._inbox = self._inbox, []
            aborts, self._abort_inbox = self._abort_inbox, []
        for seq in new:
            self._num_prompt_tokens += seq.num_prompt_tokens
            self.scheduler.add(seq)
        aborted = []
        for request_id in aborts:
            seq = self._live.get(request_id)
            if seq is not None and not seq.is_finished:
                self.scheduler.finish(seq, "abort")
                aborted.append(seq)
        return aborted

    def _append_token(self, seq: Sequence, token_id: int, logprob: dict | None) -> bool:
        """Add a sampled token; True when it finishes ``seq`` (and it was released)."""
        seq.token_ids.append(token_id)
        self._num_generated_tokens += 1
        if seq.logprobs is not None:
            seq.logprobs.append(logprob)
        params = seq.params
        reason = None
        if seq.num_output_tokens >= params.min_tokens and (
                token_id in params.stop_token_ids
                or (not params.ignore_eos and token_id in self.eos_token_ids)):
            reason = "stop"
        elif (params.stop or seq.stream) and self._truncate_at_stop_string(seq):
            reason = "stop"
        elif seq.num_output_tokens >= params.max_tokens or len(seq) >= self.max_model_len:
            reason = "length"
        if reason is None:
            return False
        self.scheduler.finish(seq, reason)
        return True

    def _truncate_at_stop_string(self, seq: Sequence) -> bool:
        """Decode the new token's text; True when it completes a stop string."""
        new_text = self._decode_new_text(seq)
        if not seq.params.stop or seq.num_output_tokens < seq.params.min_tokens:
            return False
        text = seq.output_text
        # Earlier steps found no stop, so a match ends in the new text; the 16 characters keep
        # matches that straddle the min_tokens boundary, as a tail search of the full text did.
        start = max(0, len(text) - max(len(new_text), 16) - max(map(len, seq.params.stop)))
        hits = [i for stop in seq.params.stop if (i := text.find(stop, start)) != -1]
        if not hits:
            return False
        seq.stop_text = text[:min(hits)]
        return True

    def _decode_new_text(self, seq: Sequence) -> str:
        """Append the text of the newest output token to ``seq.output_text`` and return it.

        Decodes a window of a few tokens (the previous step's ones as context), as vLLM's
        incremental detokenizer does, instead of the whole output at every step (O(n^2)).
        """
        start = seq.num_prompt_tokens
        context = self._decode_ids(seq.token_ids[start + seq.prefix_offset:
                                                 start + seq.read_offset])
        window = self._decode_ids(seq.token_ids[start + seq.prefix_offset:])
        # A byte-level token may end inside a UTF-8 character (at most 4 bytes): wait for the rest.
        if window.endswith("\ufffd") and seq.num_output_tokens - seq.read_offset < 4:
            return ""
        new_text = window[len(context):]
        seq.output_text += new_text
        seq.prefix_offset, seq.read_offset = seq.read_offset, seq.num_output_tokens
        return new_text

    def _delta_output(self, seq: Sequence) -> RequestOutput:
        """The text and token ids `seq` produced since its previous delta. Text that could still
        become the start of a stop string is held back, so that every delta is a prefix of the
        final text (which cuts the stop string off); the final output carries the rest."""
        end = max(seq.num_streamed_chars,
                  len(seq.output_text) - _num_held_back_chars(seq.params))
        text = seq.output_text[seq.num_streamed_chars:end]
        token_ids = seq.token_ids[seq.num_prompt_tokens + seq.num_streamed_tokens:]
        seq.num_streamed_chars, seq.num_streamed_tokens = end, seq.num_output_tokens
        return RequestOutput(seq.request_id, [], [CompletionOutput(text, token_ids, None)],
                             finished=False)

    def _decode(self, seq: Sequence) -> str:
        return self._decode_ids(seq.output_token_ids)

    def _decode_ids(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _finish_output(self, seq: Sequence) -> RequestOutput:
        with self._lock:
            self._live.pop(seq.request_id, None)
        text = seq.stop_text if seq.stop_text is not None else self._decode(seq)
        token_texts = None
        if seq.logprobs is not None:  # the tokens named, as their own text (OpenAI's `token`)
            token_texts = {token_id: self.tokenizer.decode([token_id])
                           for entry in seq.logprobs if entry for token_id in entry}
        completion = CompletionOutput(text=text, token_ids=seq.output_token_ids,
                                      finish_reason=seq.finish_reason, logprobs=seq.logprobs,
                                      token_texts=token_texts)
        return RequestOutput(seq.request_id, seq.token_ids[:seq.num_prompt_tokens],
                             [completion], finished=True)


def _num_held_back_chars(params: SamplingParams) -> int:
    """A streamed request's trailing characters that could still start a stop string."""
    return max(map(len, params.stop), default=1) - 1


def _eos_token_ids(hf_config, tokenizer) -> set[int]:
    ids = getattr(hf_config, "eos_token_id", None)
    ids = set(ids) if isinstance(ids, list) else ({ids} if ids is not None else set())
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
