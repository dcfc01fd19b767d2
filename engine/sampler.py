"""Sampler: vectorized temperature / top-k / top-p / min-p / penalties over a batch of rows.

Every row draws its uniform from its own request's ``torch.Generator``, and all other work is
row-wise, so a seeded request gets the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import torch

from engine.sequence import Sequence


class Sampler:
    def __init__(self, eos_token_ids: set[int]):
        self.eos_token_ids = eos_token_ids

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor,
               seqs: list[Sequence]) -> tuple[list[int], list[dict[int, float] | None]]:
        """Next token per row of float32 ``logits`` [rows, vocab] (modified in place)."""
        params = [seq.params for seq in seqs]
        self._ban_stop_tokens_before_min(logits, seqs)
        if any(p.has_penalties for p in params):
            self._apply_penalties(logits, seqs)
        logprobs = None
        if any(p.logprobs is not None for p in params):
            logprobs = torch.log_softmax(logits, dim=-1)
        if all(p.is_greedy for p in params):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample_random(logits, seqs)
        token_ids = tokens.tolist()
        return token_ids, self._logprob_dicts(logprobs, token_ids, params)

    def _ban_stop_tokens_before_min(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        for row, seq in enumerate(seqs):
            if seq.num_output_tokens < seq.params.min_tokens:
                banned = set(seq.params.stop_token_ids)
                if not seq.params.ignore_eos:
                    banned |= self.eos_token_ids
                if banned:
                    logits[row, list(banned)] = float("-inf")

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
        # vLLM semantics: repetition over prompt + output, presence / frequency over output.
        vocab = logits.shape[1]
        for row, seq in enumerate(seqs):
            p = seq.params
            if not p.has_penalties:
                continue
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(seq.token_ids)), device=logits.device)
                values = logits[row, seen]
                logits[row, seen] = torch.where(values > 0, values / p.repetition_penalty,
                                                values * p.repetition_penalty)
            if seq.num_output_tokens and (p.presence_penalty or p.frequency_penalty):
                output = torch.tensor(seq.output_token_ids, device=logits.device)
                counts = torch.bincount(output, minlength=vocab).to(logits.dtype)
                logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)

    @staticmethod
    def _sample_random(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [seq.params for seq in seqs]
        vocab, device = logits.shape[1], logits.device

        def column(values: list) -> torch.Tensor:
            return torch.tensor(values, device=device)

        greedy = column([p.is_greedy for p in params])
        greedy_tokens = logits.argmax(dim=-1)
        logits = logits / column([p.temperature or 1.0 for p in params]).unsqueeze(1)
        # Drawn on the CPU from each request's own generator: reproducible on any device.
        uniform = torch.cat([torch.rand(1, generator=seq.generator) for seq in seqs]).to(device)
        top_k = column([p.top_k if p.top_k > 0 else vocab for p in params])
        top_p = column([p.top_p for p in params])
        min_p = column([p.min_p for p in params])
        filtered = any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in params)
        order = None
        if filtered:
            logits, order = logits.sort(dim=-1, descending=True)
            ranks = torch.arange(vocab, device=device).unsqueeze(0)
            logits = logits.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
            drop = (before > top_p.unsqueeze(1)) | (probs < min_p.unsqueeze(1) * probs[:, :1])
            drop[:, 0] = False  # the most likely token always survives
            logits = logits.masked_fill(drop, float("-inf"))
        cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
        picks = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(1)).clamp_(max=vocab - 1)
        if order is not None:
            picks = order.gather(1, picks)
        return torch.where(greedy, greedy_tokens, picks.squeeze(1))

    @staticmethod
    def _logprob_dicts(logprobs: torch.Tensor | None, token_ids: list[int],
                       params: list) -> list[dict[int, float] | None]:
        if logprobs is None:
            return [None] * len(token_ids)
        result: list[dict[int, float] | None] = []
        for row, (token, p) in enumerate(zip(token_ids, params, strict=True)):
            if p.logprobs is None:
                result.append(None)
                continue
            entry = {token: logprobs[row, token].item()}
            if p.logprobs:
                values, ids = logprobs[row].topk(p.logprobs)
                entry.update(zip(ids.tolist(), values.tolist(), strict=True))
            result.append(entry)
        return result
