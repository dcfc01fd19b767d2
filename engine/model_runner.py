"""ModelRunner: owns the model and the KV pool; turns a schedule into one packed forward + sample.

All per-step metadata (positions, slots, gather indices, masks) is built here once and shared by
every layer. Rows are packed decode-first, then each prefill chunk, with no padding.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

from engine.attention import AttentionMetadata, DecodeGroup, PagedDecode, PrefillChunk
from engine.config import EngineConfig, available_memory_bytes
from engine.cpu_kernels import cpu_kernels_available
from engine.models.llama import LlamaForCausalLM
from engine.sampler import Sampler
from engine.sequence import Sequence

DECODE_LENGTH_STEP = 32


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
        self.uses_paged_kernel = (self.device.type == "cpu" and model.dtype == torch.bfloat16
                                  and cpu_kernels_available())

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

    def prepare(self, scheduled: list[tuple[Sequence, int]]
                ) -> tuple[torch.Tensor, AttentionMetadata, torch.Tensor,
                           list[tuple[Sequence, int]]]:
        """(input ids, attention metadata, logits rows, the schedule in packed order: decodes
        by context length, then prefill chunks)."""
        decodes = sorted(((seq, n) for seq, n in scheduled if n == 1), key=lambda e: len(e[0]))
        packed = decodes + [(seq, n) for seq, n in scheduled if n > 1]
        input_ids, positions, slots, logits_rows = [], [], [], []
        for seq, n in packed:
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            slots.extend(self._slots(seq, start, start + n))
            if start + n == len(seq):
                logits_rows.append(len(input_ids) - 1)
        long = dict(dtype=torch.long)
        positions_t = torch.tensor(positions, **long).to(self.model.cos_table.device)
        meta = AttentionMetadata(
            num_slots=self.num_slots, slots=torch.tensor(slots, **long),
            cos=self.model.cos_table[positions_t].unsqueeze(1),
            sin=self.model.sin_table[positions_t].unsqueeze(1))
        if self.uses_paged_kernel and decodes:
            meta.paged_decode = self._paged_decode([seq for seq, _ in decodes])
        else:
            meta.decode_groups = self._decode_groups([seq for seq, _ in decodes])
        row = len(decodes)
        for seq, n in packed[len(decodes):]:
            meta.prefills.append(self._prefill_chunk(seq, row, n))
            row += n
        input_ids_t = torch.tensor(input_ids, **long)
        logits_index = torch.tensor(logits_rows, **long)
        if self.device.type != "cpu":
            meta.to(self.device)
            input_ids_t = input_ids_t.to(self.device, non_blocking=True)
            logits_index = logits_index.to(self.device, non_blocking=True)
        return input_ids_t, meta, logits_index, packed

    def _paged_decode(self, seqs: list[Sequence]) -> PagedDecode:
        width = max(len(seq.block_table) for seq in seqs)
        tables = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, seq in enumerate(seqs):
            tables[row, :len(seq.block_table)] = torch.tensor(seq.block_table)
        lengths = torch.tensor([seq.num_computed_tokens + 1 for seq in seqs])
        return PagedDecode(len(seqs), tables, lengths, self.block_size)

    def _decode_groups(self, seqs: list[Sequence]) -> list[DecodeGroup]:
        """Split decode rows (sorted by length) in two where that saves at least a quarter of
        the padded K/V gather: the gather is the largest part of decode attention on CPU."""
        if not seqs:
            return []
        lengths = [seq.num_computed_tokens + 1 for seq in seqs]
        whole = len(seqs) * lengths[-1]
        cost, split = min((k * lengths[k - 1] + (len(seqs) - k) * lengths[-1], k)
                          for k in range(1, len(seqs) + 1))
        if cost > 0.75 * whole or split == len(seqs):
            return [self._decode_group(seqs, 0)]
        return [self._decode_group(seqs[:split], 0), self._decode_group(seqs[split:], split)]

    def _decode_group(self, seqs: list[Sequence], start: int) -> DecodeGroup:
        lengths = torch.tensor([seq.num_computed_tokens + 1 for seq in seqs])
        # Padded to a multiple of DECODE_LENGTH_STEP: oneDNN builds a bf16 GEMM kernel per
        # shape, and a length that grows by one each step rebuilt it every step (65 us per
        # call instead of 23 at batch 1, Zen 4).
        length = -(-int(lengths.max()) // DECODE_LENGTH_STEP) * DECODE_LENGTH_STEP
        num_table = -(-length // self.block_size)
        tables = torch.zeros(len(seqs), num_table, dtype=torch.long)
        for row, seq in enumerate(seqs):
            table = seq.block_table[:num_table]
            tables[row, :len(table)] = torch.tensor(table)
        offsets = torch.arange(self.block_size)
        slots = (tables.unsqueeze(-1) * self.block_size + offsets).view(len(seqs), -1)[:, :length]
        valid = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
        kv_heads = self.model.num_kv_heads
        bias = torch.zeros(len(seqs), 1, length, dtype=self.model.dtype)
        bias = bias.masked_fill_(~valid.unsqueeze(1), float("-inf"))
        bias = bias.expand(kv_heads, -1, -1, -1).reshape(kv_heads * len(seqs), 1, length)
        return DecodeGroup(start, len(seqs), length, self._pool_rows(slots.masked_fill(~valid, 0)),
                           bias)

    def _prefill_chunk(self, seq: Sequence, row: int, n: int) -> PrefillChunk:
        cached = seq.num_computed_tokens
        if not cached:
            return PrefillChunk(row, n, 0, None, None)
        context = cached + n
        keys = torch.arange(context).unsqueeze(0)
        queries = torch.arange(cached, context).unsqueeze(1)
        slots = torch.tensor(self._slots(seq, 0, context), dtype=torch.long)
        return PrefillChunk(row, n, cached, self._pool_rows(slots), keys <= queries)

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]]
            ) -> tuple[list[Sequence], list[int], list[dict[int, float] | None]]:
        """Forward the scheduled chunks; sample for sequences whose chunk reached their end."""
        input_ids, meta, logits_index, packed = self.prepare(scheduled)
        logits = self.model.forward(input_ids, meta, self.kv_cache, logits_index)
        sampling = [seq for seq, n in packed if seq.num_computed_tokens + n == len(seq)]
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
