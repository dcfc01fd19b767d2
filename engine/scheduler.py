"""Scheduler: continuous batching with chunked prefill, priorities and preemption by recompute.

Each step spends a token budget (``max_num_batched_tokens``): running sequences first, in
priority order (lower number first, then arrival), one token for a decode and up to the rest of
the budget for a prefill chunk; then waiting sequences are admitted in the same order while
there are seats (``max_num_seqs``) and KV blocks. Admission is strict: a waiting request that
does not fit blocks the ones behind it, so a low-priority flood cannot starve a big request.
When a running sequence needs a block and none is free, the lowest-priority, newest running
sequence not yet scheduled this step is preempted: its blocks are freed and it re-enters the
waiting queue with all its tokens as prompt, to be recomputed (prefix caching makes that cheap).
Seats and blocks are preempted the same way for a waiting request of a higher class: when all
seats are taken, or its blocks do not fit, the lowest-class, newest running sequences give them
up, so an interactive request starts at the next step instead of waiting for a batch sequence to
finish. A request never preempts its own class or a higher one, so equals do not thrash.
"""

from __future__ import annotations

import heapq

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.block_manager = block_manager
        self.waiting: list[tuple[tuple[int, int], Sequence]] = []  # heap on sort_key
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        heapq.heappush(self.waiting, (seq.sort_key, seq))

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, number of its tokens to compute) for this step."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        self._free_seats_for_higher_classes()
        self.running.sort(key=lambda seq: seq.sort_key)
        pending = list(self.running)
        while pending and budget:
            seq = pending.pop(0)
            num_tokens = min(seq.num_remaining_tokens, budget)
            while not self.block_manager.can_append(seq, num_tokens):
                victim = pending.pop() if pending else seq
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            self.block_manager.may_append(seq, num_tokens)
            scheduled.append((seq, num_tokens))
            budget -= num_tokens
        while self.waiting and budget and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0][1]
            if not self.block_manager.can_allocate(seq):
                budget += self._free_blocks_for_higher_class(seq, scheduled)
                if not self.block_manager.can_allocate(seq):
                    break
            heapq.heappop(self.waiting)
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_tokens = min(seq.num_remaining_tokens, budget)
            scheduled.append((seq, num_tokens))
            budget -= num_tokens
        return scheduled

    def _free_seats_for_higher_classes(self) -> None:
        while self.waiting and len(self.running) >= self.max_num_seqs:
            victim = max(self.running, key=lambda seq: seq.sort_key)
            if self.waiting[0][1].priority >= victim.priority:
                return
            self._preempt(victim)

    def _free_blocks_for_higher_class(self, seq: Sequence,
                                      scheduled: list[tuple[Sequence, int]]) -> int:
        """Preempt the fewest lowest-class running sequences whose blocks make room for ``seq``;
        none when even all of them would not. Returns the token budget they gave back."""
        lower = sorted((s for s in self.running if s.priority > seq.priority),
                       key=lambda s: s.sort_key, reverse=True)
        count = self.block_manager.num_to_deallocate_for(
            lower, self.block_manager.num_blocks_to_allocate(seq))
        if count is None:
            return 0
        victims = lower[:count]
        refund = sum(n for s, n in scheduled if s in victims)
        scheduled[:] = [(s, n) for s, n in scheduled if s not in victims]
        for victim in victims:
            self._preempt(victim)
        return refund

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        self.add(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark ``seq`` finished and release its blocks, wherever it is queued."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.deallocate(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting = [entry for entry in self.waiting if entry[1] is not seq]
            heapq.heapify(self.waiting)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
