"""Sequence: one request's token ids, progress, block table and finish state."""

from __future__ import annotations

import itertools
from enum import Enum, auto

import torch

from engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """A request as the scheduler sees it.

    ``num_computed_tokens`` counts tokens whose K/V are in the cache; the next step computes
    ``token_ids[num_computed_tokens:]`` (or a chunk of them). A sequence whose remaining tokens
    are exactly one is decoding; more than one is (chunked) prefill, which is also how a
    preempted sequence recomputes its prompt plus its output so far.
    """

    _arrival_counter = itertools.count()

    def __init__(self, request_id: str, token_ids: list[int], params: SamplingParams,
                 priority: int = 0, generator: torch.Generator | None = None,
                 stream: bool = False):
        self.request_id = request_id
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.params = params
        self.priority = priority
        self.arrival = next(Sequence._arrival_counter)
        self.generator = generator
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_hashed_blocks = 0
        self.last_block_hash: bytes | None = None
        self.finish_reason: str | None = None
        self.stop_text: str | None = None  # output text cut before a matched stop string
        # A streamed request reports its new text and token ids at every step; these count
        # what it has reported so far.
        self.stream = stream
        self.num_streamed_chars = self.num_streamed_tokens = 0
        # Incremental detokenization, kept for requests with stop strings or streamed: the text of
        # the first ``read_offset`` output tokens, and where the next decode window starts.
        self.output_text = ""
        self.prefix_offset = self.read_offset = 0
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def sort_key(self) -> tuple[int, int]:
        """Lower is served first: priority class, then arrival order."""
        return (self.priority, self.arrival)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_remaining_tokens(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def block_token_ids(self, index: int, block_size: int) -> list[int]:
        return self.token_ids[index * block_size:(index + 1) * block_size]
