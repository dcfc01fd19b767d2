"""ModelRunner: owns the model and the KV pool; turns a schedule into one packed forward + sample.

All per-step metadata (positions, slot rows, gather indices, masks) is built here once and shared
by every layer. Rows are packed decode-first, then each prefill chunk, with no padding.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

from engine.config import EngineConfig, available_memory_bytes
from engine.models.llama import LlamaForCausalLM, PrefillSlice, StepInputs
from engine.sampler import Sampler
from engine.sequence import Sequence


class ModelRunner:
    def __init__(self, config: EngineConfig, model: LlamaForCausalLM, sampler: Sampler):
        self.config = config
        self.model = model
        self.sampler = sampler
        self.device = torch.device(config.device)
        if self.device.type == "cpu":
            keep_freed_memory_mapped()
        self.block_size = config.block_size
        self.num_blocks = self._num_kv_blocks()
        self.num_slots = self.num_blocks * self.block_size
        self.kv_cache = model.allocate_kv_cache(self.num_slots)
        kv_heads = model.num_kv_heads
        # Row offset of (k|v, head) planes in a layer's pool: row = plane_offset + slot.
        self.plane_offsets = (torch.arange(2 * kv_heads) * self.num_slots).unsqueeze(1)

    def _num_kv_blocks(self) -> int:
        config, model = self.config, self.model
        tokens = config.kv_cache_tokens
        if tokens is None:
            budget = available_memory_bytes(config.device) * config.kv_cache_memory_fraction
            wanted = max(model.max_model_len, config.max_num_seqs * 1024)
            tokens = min(wanted, int(budget // model.kv_cache_bytes_per_token()))
        return max(1, tokens // self.block_size)

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        table, size = seq.block_table, self.block_size
        return [table[p // size] * size + p % size for p in range(start, end)]

    def _pool_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Pool rows of every (k|v, head) plane for ``slots``, in plane-major order."""
        return (self.plane_offsets + slots.view(1, -1)).view(-1)

    def prepare(self, scheduled: list[tuple[Sequence, int]]) -> StepInputs:
        decodes = [(seq, n) for seq, n in scheduled if n == 1]
        prefills = [(seq, n) for seq, n in scheduled if n > 1]
        input_ids, positions, slots, logits_rows = [], [], [], []
        for seq, n in decodes + prefills:
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            slots.extend(self._slots(seq, start, start + n))
            if start + n == len(seq):
                logits_rows.append(len(input_ids) - 1)
        long = dict(dtype=torch.long)
        positions_t = torch.tensor(positions, **long).to(self.model.cos_table.device)
        step = StepInputs(
            input_ids=torch.tensor(input_ids, **long),
            cos=self.model.cos_table[positions_t].unsqueeze(1),
            sin=self.model.sin_table[positions_t].unsqueeze(1),
            write_index=self._pool_rows(torch.tensor(slots, **long)),
            num_decode=len(decodes), decode_gather_index=None, decode_bias=None,
            decode_length=0, prefills=[], logits_index=torch.tensor(logits_rows, **long))
        if decodes:
            self._prepare_decode(step, [seq for seq, _ in decodes])
        row = len(decodes)
        for seq, n in prefills:
            step.prefills.append(self._prefill_slice(seq, row, n))
            row += n
        return self._to_device(step)

    def _prepare_decode(self, step: StepInputs, seqs: list[Sequence]) -> None:
        lengths = torch.tensor([seq.num_computed_tokens + 1 for seq in seqs])
        length = int(lengths.max())
        num_table = -(-length // self.block_size)
        tables = torch.zeros(len(seqs), num_table, dtype=torch.long)
        for row, seq in enumerate(seqs):
            table = seq.block_table[:num_table]
            tables[row, :len(table)] = torch.tensor(table)
        offsets = torch.arange(self.block_size)
        slots = (tables.unsqueeze(-1) * self.block_size + offsets).view(len(seqs), -1)[:, :length]
        valid = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
        step.decode_gather_index = self._pool_rows(slots.masked_fill(~valid, 0))
        step.decode_bias = torch.zeros(len(seqs), 1, length).masked_fill_(
            ~valid.unsqueeze(1), float("-inf"))
        step.decode_length = length

    def _prefill_slice(self, seq: Sequence, row: int, n: int) -> PrefillSlice:
        cached = seq.num_computed_tokens
        if cached == 0:
            return PrefillSlice(row, n, 0, None, None)
        context = cached + n
        slots = torch.tensor(self._slots(seq, 0, context), dtype=torch.long)
        keys = torch.arange(context).unsqueeze(0)
        queries = torch.arange(cached, context).unsqueeze(1)
        return PrefillSlice(row, n, cached, self._pool_rows(slots), keys <= queries)

    def _to_device(self, step: StepInputs) -> StepInputs:
        if self.device.type == "cpu":
            return step
        move = dict(device=self.device, non_blocking=True)
        for name in ("input_ids", "write_index", "decode_gather_index", "decode_bias",
                     "logits_index"):
            value = getattr(step, name)
            if value is not None:
                setattr(step, name, value.to(**move))
        for piece in step.prefills:
            if piece.gather_index is not None:
                piece.gather_index = piece.gather_index.to(**move)
                piece.mask = piece.mask.to(**move)
        return step

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]]
            ) -> tuple[list[Sequence], list[int], list[dict[int, float] | None]]:
        """Forward the scheduled chunks; sample for sequences whose chunk reached their end."""
        step = self.prepare(scheduled)
        logits = self.model.forward(step, self.kv_cache)
        ordered = [s for s, n in scheduled if n == 1] + [s for s, n in scheduled if n > 1]
        counts = {id(s): n for s, n in scheduled}
        sampling = [s for s in ordered if s.num_computed_tokens + counts[id(s)] == len(s)]
        if not sampling:
            return [], [], []
        token_ids, logprobs = self.sampler.sample(logits, sampling)
        return sampling, token_ids, logprobs


def keep_freed_memory_mapped() -> None:
    """Stop glibc from returning freed activation buffers to the OS after every op.

    With the default thresholds, each multi-megabyte activation of a prefill chunk is mmapped,
    page-faulted in and unmapped again: elementwise ops ran 5-10x slower than with the memory
    kept (measured on [1024, 3072] bf16). Process-wide, which suits a process built around the
    engine; other allocators (jemalloc, tcmalloc) ignore it.
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name)
    if hasattr(libc, "mallopt"):
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_trim_threshold, 1 << 30)
        libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum
