"""genq's CPU ops agree with the ATen paths they replace: the paged decode kernel with gather +
GEMM, one-op RMSNorm and RoPE with their Python forms."""

from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from engine.attention import DecodeGroup, PagedDecode, _decode_attention, _paged_decode_attention
from engine.cpu_kernels import cpu_kernels_available
from tests.engine.conftest import run_to_completion

KV_HEADS, HEADS, DIM, BLOCK = 3, 9, 64, 16


@pytest.fixture(scope="module")
def kernel():
    # A machine without a C++ compiler runs the gather path; this one must build the kernel.
    assert cpu_kernels_available(), "the paged decode kernel did not build"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lengths", [[1], [37], [200, 16, 5, 129]])
# SmolLM2's heads; head dim 128 (Llama-3-style); 8 query heads per KV head (the generic loop).
@pytest.mark.parametrize("shape", [(KV_HEADS, HEADS, DIM), (2, 4, 128), (1, 8, 64)])
def test_paged_kernel_matches_the_gather_path(kernel, dtype, lengths, shape):
    KV_HEADS, HEADS, DIM = shape  # noqa: N806 (the module's names, per case)
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
    assert engine.runner.uses_paged_kernel and engine.runner.model.uses_fused_ops
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i in range(4):
        engine.add_request(str(i), list(range(5, 30 + 7 * i)), params)
    outputs = run_to_completion(engine)
    assert all(len(outputs[str(i)].outputs[0].token_ids) == 40 for i in range(4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_one_op_rms_norm_matches_the_python_form(kernel, dtype, rows):
    from engine.models.llama import rms_norm

    torch.manual_seed(0)
    x = (torch.randn(rows, 2 * 576) * 3).to(dtype)[:, :576]  # a row stride, as x[index] has
    weight = torch.randn(576).to(dtype)

    ours = torch.ops.genq.rms_norm(x, weight, 1e-5)

    reference = rms_norm(x, weight, 1e-5)
    assert ours.dtype == dtype and ours.shape == (rows, 576)
    # bf16: the fp32 sums differ in order only, so at most one rounding step of the output
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(ours.float(), reference.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_op_rope_rotates_q_and_k_and_stores_k_and_v_at_their_slots(kernel, dtype):
    from engine.attention import write_kv

    torch.manual_seed(0)
    tokens, heads, kv_heads, dim, num_slots = 5, HEADS, KV_HEADS, DIM, 32
    qkv = torch.randn(tokens, heads + 2 * kv_heads, dim).to(dtype)
    angles = torch.rand(tokens, 1, dim // 2) * 6
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1).to(dtype)
    sin = torch.cat((-angles.sin(), angles.sin()), dim=-1).to(dtype)  # the signed table
    slots = torch.tensor([3, 17, 0, 31, 8])
    pool = torch.zeros(2 * kv_heads * num_slots, dim, dtype=dtype)
    qk = qkv[:, :heads + kv_heads].float()
    half = dim // 2
    rotated = qk * cos.float() + torch.cat((qk[..., half:], qk[..., :half]), -1) * sin.float()
    values = qkv[:, heads + kv_heads:].clone()

    torch.ops.genq.rope_store_(qkv, cos, sin, pool, slots, heads, kv_heads)

    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(qkv[:, :heads + kv_heads].float(), rotated, atol=tolerance,
                          rtol=tolerance)
    assert torch.equal(qkv[:, heads + kv_heads:], values)
    expected_pool = torch.zeros_like(pool)
    meta = type("Meta", (), {"num_slots": num_slots, "slots": slots})
    write_kv(expected_pool, qkv[:, heads:heads + kv_heads], values, meta)
    assert torch.equal(pool, expected_pool)


@pytest.mark.parametrize("k", [1, 4, 40])
@pytest.mark.parametrize("vocab", [49152, 1000, 37])
def test_row_top_k_matches_topk_and_argmax(kernel, k, vocab):
    from engine.cpu_kernels import row_argmax, row_top_k

    k = min(k, vocab)
    torch.manual_seed(0)
    logits = torch.randn(9, vocab) * 4
    logits[1] = float("-inf")  # every candidate equal (a fully banned row)
    logits[2] = torch.randint(0, 3, (vocab,)).float()  # many ties: lower index first
    logits[3, -1] = 100.0  # the maximum in the tail past the last whole block
    logits[4, :k] = -50.0  # the first k (the initial candidates) are the smallest

    values, indices = row_top_k(logits, k)

    # Descending and ties in index order, as a stable descending sort gives
    expected_values, expected_indices = logits.sort(dim=-1, descending=True, stable=True)
    assert torch.equal(values, expected_values[:, :k])
    assert torch.equal(indices, expected_indices[:, :k])
    assert torch.equal(row_argmax(logits), logits.argmax(dim=-1))


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_live_one_kept(tmp_path,
                                                                            monkeypatch):
    # (a build killed midway left torch's lock behind: every later engine start hung on it)
    import os
    import time

    from engine.cpu_kernels import STALE_BUILD_LOCK_SECONDS, clear_stale_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    for name, age in (("stale", STALE_BUILD_LOCK_SECONDS + 60), ("live", 5)):
        (tmp_path / name).mkdir()
        lock = tmp_path / name / "lock"
        lock.write_text("")
        os.utime(lock, (time.time() - age, time.time() - age))
        clear_stale_build_lock(name)
    assert not (tmp_path / "stale" / "lock").exists()
    assert (tmp_path / "live" / "lock").exists()
