"""The CPU paged decode kernel reads K/V in place and agrees with the gather + GEMM path."""

from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from engine.attention import DecodeGroup, PagedDecode, _decode_attention, _paged_decode_attention
from engine.paged_kernel import paged_decode_kernel_available
from tests.engine.conftest import run_to_completion

KV_HEADS, HEADS, DIM, BLOCK = 3, 9, 64, 16


@pytest.fixture(scope="module")
def kernel():
    # A machine without a C++ compiler runs the gather path; this one must build the kernel.
    assert paged_decode_kernel_available(), "the paged decode kernel did not build"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lengths", [[1], [37], [200, 16, 5, 129]])
def test_paged_kernel_matches_the_gather_path(kernel, dtype, lengths):
    torch.manual_seed(0)
    num_slots = 64 * BLOCK
    pool = torch.randn(2 * KV_HEADS * num_slots, DIM).to(dtype)
    batch = len(lengths)
    width = -(-max(lengths) // BLOCK)
    # Scattered, non-consecutive blocks per row, as a busy pool hands them out.
    tables = torch.randperm(64)[:batch * width].view(batch, width).contiguous()
    q = torch.randn(batch, HEADS, DIM).to(dtype)
    paged = PagedDecode(batch, tables, torch.tensor(lengths), BLOCK)
    ours = _paged_decode_attention(q, pool, paged, KV_HEADS, DIM ** -0.5)

    length = max(lengths)
    slots = (tables.unsqueeze(-1) * BLOCK + torch.arange(BLOCK)).view(batch, -1)[:, :length]
    valid = torch.arange(length).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    rows = ((torch.arange(2 * KV_HEADS) * num_slots).unsqueeze(1)
            + slots.masked_fill(~valid, 0).reshape(1, -1)).view(-1)
    bias = torch.zeros(batch, 1, length, dtype=dtype).masked_fill_(~valid.unsqueeze(1),
                                                                   float("-inf"))
    bias = bias.expand(KV_HEADS, -1, -1, -1).reshape(KV_HEADS * batch, 1, length)
    reference = _decode_attention(q, pool, DecodeGroup(0, batch, length, rows, bias), DIM ** -0.5)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(ours.float(), reference.float(), atol=tolerance, rtol=tolerance)


def test_a_bf16_cpu_engine_decodes_through_the_kernel(kernel, tiny_engine_factory):
    engine = tiny_engine_factory(dtype="bfloat16", quantization="none")
    assert engine.runner.uses_paged_kernel
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i in range(4):
        engine.add_request(str(i), list(range(5, 30 + 7 * i)), params)
    outputs = run_to_completion(engine)
    assert all(len(outputs[str(i)].outputs[0].token_ids) == 40 for i in range(4))
