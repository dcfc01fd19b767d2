"""Sampler: vectorized temperature / top-k / top-p / min-p / penalties over a batch of rows.

Every row draws its uniform from its own request's ``torch.Generator``, and all other work is
row-wise, so a seeded request gets the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import torch

from engine.cpu_kernels import row_argmax
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
            tokens = row_argmax(logits)
        else:
            tokens = self._sample_random(logits, seqs)
        token_ids = tokens.tolist()
        return token_ids, self._logprob_dicts(logprobs, token_ids, params)

    def _ban_stop_tokens_before_min(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        vocab = logits.shape[1]
        for row, seq in enumerate(seqs):
            if seq.num_output_tokens < seq.params.min_tokens:
                banned = set(seq.params.stop_token_ids)
                if not seq.params.ignore_eos:
                    banned |= self.eos_token_ids
                banned = {token for token in banned if token < vocab}  # others never come
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
        device = logits.device
        # Drawn on the CPU from each request's own generator: reproducible on any device.
        uniform = torch.cat([torch.rand(1, generator=seq.generator) for seq in seqs]).to(device)
        temperature = torch.tensor([p.temperature or 1.0 for p in params], device=device)
        groups: dict[str, list[int]] = {"greedy": [], "plain": [], "filtered": []}
        for row, p in enumerate(params):
            kind = ("greedy" if p.is_greedy else
                    "filtered" if p.top_k > 0 or p.top_p < 1 or p.min_p > 0 else "plain")
            groups[kind].append(row)
        tokens = torch.zeros(len(seqs), dtype=torch.long, device=device)
        for kind, rows in groups.items():
            if not rows:
                continue
            index = torch.tensor(rows, device=device)
            # All rows of one kind (the usual batch) skip the copy that indexing makes.
            group = logits if len(rows) == len(seqs) else logits[index]
            if kind == "greedy":
                tokens[index] = row_argmax(group)
            elif kind == "plain":
                scaled = group / temperature[index].unsqueeze(1)
                tokens[index] = _pick(scaled, uniform[index]).squeeze(1)
            else:
                tokens[index] = _sample_filtered(group, temperature[index], uniform[index],
                                                 [params[row] for row in rows])
        return tokens

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


# Top-k / top-p / min-p keep only the head of the distribution, so the filtered rows rank a
# bounded number of candidates with topk instead of sorting the whole vocabulary (49k for
# SmolLM2): 1024 covers the top-p mass of almost every step of a trained model. A row whose
# cutoff may fall beyond the candidates (a flat distribution under top-p alone) is sorted whole.
NUM_CANDIDATES = 4096


def _sample_filtered(logits: torch.Tensor, temperature: torch.Tensor, uniform: torch.Tensor,
                     params: list) -> torch.Tensor:
    """Tokens for rows that use top-k, top-p or min-p: the filters applied in descending
    order of probability, then an inverse-CDF draw over the survivors in that order.

    Ranks are taken on the unscaled ``logits`` (a positive temperature keeps their order), so
    only the candidates are divided, unless a row's top-p needs its whole mass.
    """
    vocab, device = logits.shape[1], logits.device
    ks = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
    top_k = torch.tensor(ks, device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    min_p = torch.tensor([p.min_p for p in params], device=device)
    inverse_temperature = temperature.reciprocal().unsqueeze(1)
    log_mass = None  # log of each row's whole mass, for rows whose top-k does not bound it
    width = max(k for k in ks if k < vocab) if any(k < vocab for k in ks) else 0
    if any(k == vocab for k in ks):
        log_mass = (logits * inverse_temperature).logsumexp(dim=-1, keepdim=True)
        width = max(width, NUM_CANDIDATES)
    if width + 1 >= vocab // 2:  # topk of half the vocabulary is no cheaper than a sort
        values, order = logits.sort(dim=-1, descending=True)
        return _pick_sorted(values * inverse_temperature, order, top_k, top_p, min_p, uniform,
                            log_mass, vocab)
    # One candidate past the width tells whether min-p drops everything beyond it.
    values, order = logits.topk(width + 1, dim=-1)
    values = values * inverse_temperature
    tokens = _pick_sorted(values[:, :width], order[:, :width], top_k, top_p, min_p, uniform,
                          log_mass, vocab)
    exact = top_k <= width
    if log_mass is not None:
        head_mass = torch.exp(values[:, :width] - log_mass).sum(dim=-1)
        exact |= (head_mass > top_p) | (values[:, width] - values[:, 0] < min_p.log())
    if not exact.all():
        rows = (~exact).nonzero().squeeze(1)
        full, full_order = logits[rows].sort(dim=-1, descending=True)
        tokens[rows] = _pick_sorted(full * inverse_temperature[rows], full_order, top_k[rows],
                                    top_p[rows], min_p[rows], uniform[rows], log_mass[rows],
                                    vocab)
    return tokens


def _pick_sorted(values: torch.Tensor, order: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor, min_p: torch.Tensor, uniform: torch.Tensor,
                 log_mass: torch.Tensor | None, logits_width: int) -> torch.Tensor:
    """Filter descending ``values`` (the head of each row, or all of it) and draw.

    Top-p weighs each candidate against the row's mass after top-k: the candidates' own when
    top-k keeps no more than them, ``log_mass`` (the whole row's) otherwise.
    """
    ranks = torch.arange(values.shape[1], device=values.device).unsqueeze(0)
    values = values.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
    probs = torch.softmax(values, dim=-1)
    if log_mass is not None and values.shape[1] < logits_width:
        # Candidates of a row that top-k does not bound: scale to their share of the row.
        share = torch.exp(values.logsumexp(dim=-1, keepdim=True) - log_mass)
        probs = torch.where((top_k <= values.shape[1]).unsqueeze(1), probs, probs * share)
    before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
    drop = (before > top_p.unsqueeze(1)) | (probs < min_p.unsqueeze(1) * probs[:, :1])
    drop[:, 0] = False  # the most likely token always survives
    return order.gather(1, _pick(values.masked_fill(drop, float("-inf")), uniform)).squeeze(1)


def _pick(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row: the token where the row's CDF passes its uniform."""
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
    picks = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(1))
    return picks.clamp_(max=logits.shape[1] - 1)
