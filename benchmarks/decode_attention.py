"""Where the paged decode attention kernel stands against the machine's memory bandwidth.

    python -m benchmarks.decode_attention [--batches 1,4,16,64] [--context 200] [--threads 1]
        [--json PATH]

For SmolLM2's heads (9 query heads, 3 KV heads, dim 64, bf16), one call of
``torch.ops.genq.paged_decode_attention`` per batch size over contexts of about --context
tokens: ns per (sequence, KV head, position) and the K/V bytes it reads per second, beside a
plain streaming read of a buffer far larger than the caches (``torch.sum``) on as many threads.
A kernel whose GB/s meets the streaming read's is bound by memory, not by its arithmetic.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.peers.cpu_info import cpu_summary

KV_HEADS, HEADS, DIM, BLOCK = 3, 9, 64, 16


def _best_seconds(call, repeats: int) -> float:
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def stream_read_gb_s(megabytes: int = 512) -> float:
    buffer = torch.ones(megabytes * 2**20 // 4)
    return buffer.numel() * 4 / _best_seconds(buffer.sum, 5) / 1e9


def kernel_figures(batch: int, context: int) -> dict:
    generator = torch.Generator().manual_seed(batch)
    width = -(-(context * 3 // 2) // BLOCK)
    num_slots = batch * width * BLOCK
    pool = torch.randn(2 * KV_HEADS * num_slots, DIM, generator=generator).to(torch.bfloat16)
    lengths = torch.randint(context // 2, context * 3 // 2, (batch,), generator=generator)
    tables = torch.randperm(batch * width, generator=generator).view(batch, width).contiguous()
    q = torch.randn(batch, HEADS, DIM, generator=generator).to(torch.bfloat16)
    seconds = _best_seconds(lambda: torch.ops.genq.paged_decode_attention(
        q, pool, tables, lengths, KV_HEADS, BLOCK, DIM ** -0.5), 50)
    positions = int(lengths.sum()) * KV_HEADS
    kv_bytes = positions * 2 * DIM * pool.element_size()  # one K and one V row each
    return dict(batch=batch, kv_megabytes=round(kv_bytes / 2**20, 2),
                ms=round(seconds * 1e3, 3), ns_per_position=round(seconds * 1e9 / positions, 1),
                kv_gb_s=round(kv_bytes / seconds / 1e9, 2))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)
    from engine.cpu_kernels import cpu_kernels_available

    if not cpu_kernels_available():
        raise SystemExit("genq's CPU kernels did not build on this machine")
    torch.set_num_threads(args.threads)
    report = dict(date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), cpu=cpu_summary(),
                  threads=args.threads, context=args.context,
                  stream_read_gb_s=round(stream_read_gb_s(), 2),
                  kernel=[kernel_figures(int(b), args.context) for b in args.batches.split(",")])
    print(f"streaming read, {args.threads} thread(s): {report['stream_read_gb_s']} GB/s")
    print("batch  K/V MB  ms      ns/position  K/V GB/s")
    for row in report["kernel"]:
        print(f"{row['batch']:<6} {row['kv_megabytes']:<7} {row['ms']:<7} "
              f"{row['ns_per_position']:<12} {row['kv_gb_s']}")
    if args.json_path:
        with open(args.json_path, "w") as json_file:
            json.dump(report, json_file, indent=2)
    return report


if __name__ == "__main__":
    main()
