"""The engine beside other busy processes: OpenMP's wait policy and the thread count, side by side.

    python -m benchmarks.engine_contention [--busy 2] [--rounds 2] [--json PATH]

Each contender is a fresh process (libgomp reads OMP_WAIT_POLICY when torch loads) running 24
requests (prompts of 16-128 tokens, 16-64 output tokens, EOS ignored) and one greedy stream of
64 tokens, first on a quiet machine, then beside ``--busy`` processes that spin in Python (the
API, a worker and a database on a small host). Rounds alternate the contenders, so drifts in
the machine's load spread over all of them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time

from benchmarks.peers.cpu_info import cpu_summary

# (name, libgomp's environment, engine threads or None for all CPUs). Spinning threads wait
# for a partner at each barrier by burning their core; passive ones sleep on a futex at once;
# GOMP_SPINCOUNT bounds the spin before sleeping.
CONTENDERS = [("spin", {"OMP_WAIT_POLICY": "ACTIVE"}, None),
              ("passive", {"OMP_WAIT_POLICY": "PASSIVE"}, None),
              ("passive, 1 thread", {"OMP_WAIT_POLICY": "PASSIVE"}, 1),
              ("spin 10k, then sleep", {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "10000"}, None),
              ("spin 100k, then sleep", {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "100000"},
               None)]
_RUN = """
import json, sys, time
from engine import LLM, SamplingParams
from benchmarks.engine_throughput import random_workload
threads = json.loads(sys.argv[1])
llm = LLM("smollm2-135m", num_threads=threads)
work = random_workload(24, 0, (16, 128), (16, 64))
params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in work.output_lengths]
llm.generate(work.prompts[:2], params[:2], use_tqdm=False)
start = time.perf_counter()
tokens = sum(o.num_completion_tokens for o in llm.generate(work.prompts, params, use_tqdm=False))
batch_s = time.perf_counter() - start
stream = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
start = time.perf_counter()
llm.generate([work.prompts[0]], stream, use_tqdm=False)
print(json.dumps({"batch_tok_s": round(tokens / batch_s, 1),
                  "one_stream_ms_per_token": round(1000 * (time.perf_counter() - start) / 64, 1)}))
"""


def _spin() -> None:
    while True:
        pass


def run_contender(gomp_env: dict[str, str], threads: int | None) -> dict:
    env = {**os.environ, **gomp_env, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", _RUN, json.dumps(threads)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=2, help="spinning processes beside it")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)
    results: dict[str, dict[str, list[dict]]] = {name: {"quiet": [], "busy": []}
                                                 for name, _, _ in CONTENDERS}
    for _ in range(args.rounds):
        for condition in ("quiet", "busy"):
            spinners = [multiprocessing.Process(target=_spin, daemon=True)
                        for _ in range(args.busy if condition == "busy" else 0)]
            for spinner in spinners:
                spinner.start()
            try:
                for name, gomp_env, threads in CONTENDERS:
                    figures = run_contender(gomp_env, threads)
                    results[name][condition].append(figures)
                    print(f"{condition:5s} {name:22s} {figures}", flush=True)
            finally:
                for spinner in spinners:
                    spinner.terminate()
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": cpu_summary(),
              "busy_processes": args.busy, "rounds": args.rounds, "results": results,
              "workload": "24 requests, prompts U[16,128], outputs U[16,64]; one stream of 64"}
    if args.json_path:
        with open(args.json_path, "w") as json_file:
            json.dump(report, json_file, indent=2)
    return report


if __name__ == "__main__":
    main()
