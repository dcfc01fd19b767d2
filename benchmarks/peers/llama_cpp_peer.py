"""llama.cpp's ``llama-batched-bench`` on the bundled Q4_1 GGUF, read into genq's figures.

It makes its own random prompts, so it runs the fixed workload's shapes (prompt 128, output
64) rather than its token ids: at 32 parallel sequences for throughput, at 1 for time per token.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass

DEFAULT_BINARY = os.path.expanduser("~/.cache/genq/llama.cpp-build/bin/llama-batched-bench")
PROMPT_TOKENS, OUTPUT_TOKENS, PARALLEL = 128, 64, 32
TIMEOUT_S = 900


@dataclass(frozen=True)
class BatchedBenchRow:
    """One row of llama-batched-bench's table; times in seconds."""

    prompt_tokens: int
    output_tokens: int
    parallel: int
    prefill_s: float
    decode_s: float
    total_s: float

    @property
    def output_tok_s(self) -> float:
        """Output tokens over the whole run (prefill included), as genq's workloads count."""
        return self.parallel * self.output_tokens / self.total_s

    @property
    def decode_ms_per_token(self) -> float:
        """Decode time per output token of one sequence (llama.cpp's 1 / S_TG at B = 1)."""
        return 1000 * self.decode_s / self.output_tokens


_COLUMNS = {"PP": "prompt_tokens", "TG": "output_tokens", "B": "parallel",
            "T_PP s": "prefill_s", "T_TG s": "decode_s", "T s": "total_s"}


def parse_batched_bench(output: str) -> list[BatchedBenchRow]:
    """The rows of the ``|    PP |     TG |    B | ...`` table in llama-batched-bench's output."""
    header: list[str] | None = None
    rows = []
    for line in output.splitlines():
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == "PP":
            header = cells
        elif header and cells[0].isdigit():
            values = dict(zip(header, cells, strict=True))
            fields = {field: values[column] for column, field in _COLUMNS.items()}
            rows.append(BatchedBenchRow(
                **{name: int(fields[name]) for name in ("prompt_tokens", "output_tokens",
                                                         "parallel")},
                **{name: float(fields[name]) for name in ("prefill_s", "decode_s", "total_s")}))
    return rows


def summarize(rows: list[BatchedBenchRow]) -> dict:
    """The fixed workload's tok/s at ``PARALLEL`` sequences and ms/token for one stream."""
    by_parallel = {row.parallel: row for row in rows}
    if PARALLEL not in by_parallel or 1 not in by_parallel:
        raise ValueError(f"llama-batched-bench printed no rows for B=1 and B={PARALLEL}")
    fixed, one = by_parallel[PARALLEL], by_parallel[1]
    return dict(fixed=dict(output_tokens=fixed.parallel * fixed.output_tokens,
                           seconds=fixed.total_s, output_tok_s=round(fixed.output_tok_s, 2)),
                one_stream=dict(output_tokens=one.output_tokens, seconds=one.decode_s,
                                ms_per_token=round(one.decode_ms_per_token, 2)))


def run_llama_cpp(binary: str, gguf_path: str, threads: int) -> dict:
    """Run the bench and return its summary, or ``{"skipped": reason}`` when it cannot run."""
    if not os.access(binary, os.X_OK):
        return dict(skipped=f"no llama-batched-bench at {binary}: "
                            "run benchmarks/peers/install_peers.sh llama_cpp")
    if not os.path.exists(gguf_path):
        return dict(skipped=f"no GGUF at {gguf_path}")
    command = [binary, "-m", gguf_path, "-c", str(PARALLEL * (PROMPT_TOKENS + OUTPUT_TOKENS)),
               "-npp", str(PROMPT_TOKENS), "-ntg", str(OUTPUT_TOKENS), "-npl", f"1,{PARALLEL}",
               "-t", str(threads), "-tb", str(threads)]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
        if completed.returncode == -signal.SIGSEGV:
            # Its AMX path (weight repacking) segfaulted in ggml_backend_amx_mul_mat on a 2-core
            # Sapphire Rapids VM; without repacking it runs its plain AVX-512 kernels.
            command.append("--no-repack")
            completed = subprocess.run(command, capture_output=True, text=True,
                                       timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return dict(skipped=f"llama-batched-bench ran past {TIMEOUT_S} s")
    output = completed.stdout + completed.stderr
    if completed.returncode != 0:
        return dict(skipped=f"llama-batched-bench exited {completed.returncode}: "
                            + " | ".join(output.strip().splitlines()[-3:]))
    summary = summarize(parse_batched_bench(output))
    summary.update(command=" ".join(command), threads=threads, model=os.path.basename(gguf_path),
                   table=[line for line in output.splitlines() if line.startswith("|")])
    return summary
