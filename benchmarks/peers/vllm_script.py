"""vLLM's side of the benchmark, run by the peers venv's python (never imported by genq).

    python benchmarks/peers/vllm_script.py REQUESTS.json RESULT.json

REQUESTS.json: ``model_dir``, ``dtype``, ``workloads`` ({name: {prompts, output_lengths}}) and
``one_stream`` ({prompts: [a, b], max_tokens}). All runs are greedy with EOS ignored, on token
ids, so vLLM generates exactly the tokens genq does.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def _generate(llm, prompts: list[list[int]], output_lengths: list[int]) -> tuple[int, float]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
              for n in output_lengths]
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                           use_tqdm=False)
    seconds = time.perf_counter() - start
    return sum(len(output.outputs[0].token_ids) for output in outputs), seconds


def run(requests: dict) -> dict:
    import torch
    import vllm
    llm = vllm.LLM(model=requests["model_dir"], dtype=requests["dtype"], seed=0,
                   max_model_len=requests["max_model_len"])
    _generate(llm, [list(range(100, 228))], [4])  # as genq's warm-up: no shared prefix
    results = {}
    for name, workload in requests["workloads"].items():
        tokens, seconds = _generate(llm, workload["prompts"], workload["output_lengths"])
        results[name] = dict(output_tokens=tokens, seconds=round(seconds, 3),
                             output_tok_s=round(tokens / seconds, 2))
    # Decode time per token: a full stream minus a one-token run of another prompt of the same
    # length, so the prefill (and a prefix-cache hit) cancels out, as llama.cpp's T_TG does.
    first, second = requests["one_stream"]["prompts"]
    max_tokens = requests["one_stream"]["max_tokens"]
    prefill_tokens, prefill_s = _generate(llm, [first], [1])
    stream_tokens, stream_s = _generate(llm, [second], [max_tokens])
    tokens, seconds = stream_tokens - prefill_tokens, stream_s - prefill_s
    results["one_stream"] = dict(output_tokens=tokens, seconds=round(seconds, 3),
                                 ms_per_token=round(1000 * seconds / tokens, 2))
    results["versions"] = dict(vllm=vllm.__version__, torch=torch.__version__)
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return results


if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this file
    with open(sys.argv[1]) as requests_file:
        result = run(json.load(requests_file))
    with open(sys.argv[2], "w") as result_file:
        json.dump(result, result_file, indent=2)
