"""genq against its peers: run the requested peers and turn their figures into ratios.

Every ratio is genq's speed over the peer's, so > 1 means genq is faster: output tok/s for the
mixed and fixed workloads, the peer's ms/token over genq's for one stream.
"""

from __future__ import annotations

import os
import sys

from benchmarks.peers.llama_cpp_peer import DEFAULT_BINARY, run_llama_cpp
from benchmarks.peers.vllm_peer import DEFAULT_PYTHON, run_vllm

PEERS = ("vllm", "llama_cpp")
WORKLOADS = ("mixed", "fixed", "one_stream")


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 2)


def peer_ratios(genq: dict, peer: dict) -> dict[str, float | None]:
    """{workload: genq speed / peer speed}; None where either side has no figure.

    ``genq`` and ``peer`` map workload names to result dicts: ``output_tok_s`` for the
    throughput workloads, ``ms_per_token`` for ``one_stream``.
    """
    def figure(side: dict, workload: str, key: str) -> float | None:
        return (side.get(workload) or {}).get(key)

    ratios = {workload: _ratio(figure(genq, workload, "output_tok_s"),
                               figure(peer, workload, "output_tok_s"))
              for workload in ("mixed", "fixed")}
    ratios["one_stream"] = _ratio(figure(peer, "one_stream", "ms_per_token"),
                                  figure(genq, "one_stream", "ms_per_token"))
    return ratios


def run_peers(peers: list[str], *, model: str, dtype: str, workloads: dict, one_stream,
              device: str = "cpu", vllm_python: str = DEFAULT_PYTHON,
              llama_binary: str = DEFAULT_BINARY) -> dict[str, dict]:
    """{peer: its figures or {"skipped": reason}}, one peer after the other.

    ``workloads`` maps names to objects with ``prompts`` and ``output_lengths``; ``one_stream``
    has two prompts, the second run for ``output_lengths[1]`` tokens. Peers run only SmolLM2's
    real weights: the safetensors genq caches (vLLM) and the bundled GGUF (llama.cpp).
    """
    if model != "smollm2-135m":
        return {peer: dict(skipped=f"peers run smollm2-135m only, not {model}") for peer in peers}
    # Imported here: the benchmark's parent process loads torch only when a peer runs.
    from engine.config import resolve_device, resolve_dtype
    from engine.model_loader import bundled_gguf_path, default_cache_dir
    if resolve_device(device) != "cpu":
        return {peer: dict(skipped=f"peers are CPU baselines; genq ran on {device}")
                for peer in peers}
    num_cpus = len(os.sched_getaffinity(0))
    requests = dict(
        max_model_len=2048,
        workloads={name: dict(prompts=w.prompts, output_lengths=w.output_lengths)
                   for name, w in workloads.items()},
        one_stream=dict(prompts=one_stream.prompts, max_tokens=one_stream.output_lengths[1]))
    results = {}
    for peer in peers:
        load_before = os.getloadavg()[0]
        if peer == "vllm":
            vllm_dtype = str(resolve_dtype(dtype, "cpu")).removeprefix("torch.")
            results[peer] = run_vllm(vllm_python, os.path.join(default_cache_dir(), model),
                                     vllm_dtype, requests, num_cpus)
        elif peer == "llama_cpp":
            try:
                results[peer] = run_llama_cpp(llama_binary, bundled_gguf_path(), num_cpus)
            except FileNotFoundError as error:
                results[peer] = dict(skipped=str(error))
        else:
            raise ValueError(f"unknown peer {peer!r}: expected one of {PEERS}")
        # As for genq's contenders: a busy machine distorts every engine differently.
        results[peer]["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        print(f"{peer}: {results[peer]}", file=sys.stderr, flush=True)
    return results
