"""SamplingParams: how one request is decoded (vLLM names and meanings)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

# Bounds that keep one request's cost and arithmetic in range, whatever a client sends: a value
# past them is refused here, so it never reaches (and aborts) a batched engine step.
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 64
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-2, 1e6
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """Per-request decoding settings, validated on construction.

    ``temperature=0`` is greedy. ``top_k`` of ``-1`` or ``0`` means off, and one above the
    vocabulary means all of it (the sampler clamps it). ``stop`` strings end
    the output and are not included in the returned text. ``logprobs=n`` returns, per generated
    token, the log-probabilities of the sampled token and the ``n`` most likely ones.
    """

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("stop", "stop_token_ids"):
            if not isinstance(getattr(self, name) or [], list | tuple):
                raise ValueError(f"{name} must be a list, got {_shown(getattr(self, name))}")
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        broken = next(_checks(self), None)
        if broken is not None:
            name, rule = broken
            raise ValueError(f"{name} {rule}, got {_shown(getattr(self, name))}")

    @property
    def is_greedy(self) -> bool:
        # Below this, dividing logits by the temperature overflows float32 (as vLLM's epsilon).
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _checks(p: SamplingParams) -> Iterator[tuple[str, str]]:
    """(field, rule) for each rule that ``p`` breaks, integer types checked first."""
    for name in ("max_tokens", "min_tokens", "top_k"):
        if not _is_int(getattr(p, name)):
            yield name, "must be an int"
            return
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"):
        if not _is_number(getattr(p, name)):
            yield name, "must be a finite number"
            return
    rules = [
        ("max_tokens", p.max_tokens >= 1, "must be >= 1"),
        ("min_tokens", 0 <= p.min_tokens <= p.max_tokens, "must be >= 0 and <= max_tokens"),
        ("temperature", p.temperature >= 0, "must be >= 0"),
        ("top_p", 0 < p.top_p <= 1, "must be in (0, 1]"),
        ("top_k", p.top_k >= -1, "must be -1 (off), 0 (off) or >= 1"),
        ("min_p", 0 <= p.min_p <= 1, "must be in [0, 1]"),
        ("repetition_penalty",
         MIN_REPETITION_PENALTY <= p.repetition_penalty <= MAX_REPETITION_PENALTY,
         f"must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}]"),
        ("presence_penalty", -2 <= p.presence_penalty <= 2, "must be in [-2, 2]"),
        ("frequency_penalty", -2 <= p.frequency_penalty <= 2, "must be in [-2, 2]"),
        ("seed", p.seed is None or (_is_int(p.seed) and SEED_RANGE[0] <= p.seed < SEED_RANGE[1]),
         "must be None or an int in [-2**63, 2**64)"),
        ("logprobs", p.logprobs is None or (_is_int(p.logprobs) and 0 <= p.logprobs
                                            <= MAX_LOGPROBS),
         f"must be None or an int in [0, {MAX_LOGPROBS}]"),
        ("stop_token_ids", len(p.stop_token_ids) <= MAX_STOP_TOKEN_IDS
         and all(_is_int(t) and t >= 0 for t in p.stop_token_ids),
         f"must be at most {MAX_STOP_TOKEN_IDS} non-negative ints"),
        ("stop", len(p.stop) <= MAX_STOP_STRINGS and all(
            isinstance(s, str) and len(s) <= MAX_STOP_STRING_CHARS for s in p.stop),
         f"must be str or a list of at most {MAX_STOP_STRINGS} str of at most "
         f"{MAX_STOP_STRING_CHARS} characters"),
    ]
    yield from ((name, rule) for name, ok, rule in rules if not ok)


def _shown(value: object) -> str:
    """The offending value for an error message, cut short (a stop list can be long)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
