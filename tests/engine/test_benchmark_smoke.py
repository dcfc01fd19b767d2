"""The throughput benchmark still runs end to end (a few requests on a tiny dummy model), and its
peer side reads llama.cpp's table, computes ratios and skips a missing peer without crashing."""

from __future__ import annotations

import json
import os
import stat
import statistics

import pytest

from benchmarks.engine_throughput import main, parse_engine_options
from benchmarks.peers.comparison import peer_ratios, run_peers
from benchmarks.peers.llama_cpp_peer import parse_batched_bench, run_llama_cpp, summarize
from benchmarks.peers.vllm_peer import run_vllm

# Real output of llama-batched-bench (llama-cpp-python 0.3.36's llama.cpp) on the bundled GGUF.
SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "peers",
                      "llama_batched_bench_sample.txt")


def test_batched_bench_table_is_read_into_tok_s_and_ms_per_token():
    with open(SAMPLE) as sample:
        rows = parse_batched_bench(sample.read())

    assert [(r.prompt_tokens, r.output_tokens, r.parallel) for r in rows] == [(128, 64, 1),
                                                                              (128, 64, 32)]
    one, fixed = rows
    summary = summarize(rows)
    assert summary["fixed"]["output_tokens"] == 32 * 64
    assert summary["fixed"]["output_tok_s"] == pytest.approx(32 * 64 / fixed.total_s, abs=0.01)
    assert summary["one_stream"]["ms_per_token"] == pytest.approx(1000 * one.decode_s / 64,
                                                                  abs=0.01)


def test_a_table_without_the_needed_rows_is_an_error_not_a_figure():
    with pytest.raises(ValueError, match="B=1 and B=32"):
        summarize(parse_batched_bench("main: error: unable to load model\n"))


def test_ratios_are_genq_speed_over_peer_speed():
    genq = dict(mixed=dict(output_tok_s=300.0), fixed=dict(output_tok_s=200.0),
                one_stream=dict(ms_per_token=20.0))
    peer = dict(fixed=dict(output_tok_s=400.0), one_stream=dict(ms_per_token=30.0))

    ratios = peer_ratios(genq, peer)

    assert ratios == dict(mixed=None, fixed=0.5, one_stream=1.5)


def test_missing_peers_are_skipped_with_how_to_install_them(tmp_path):
    vllm = run_vllm(str(tmp_path / "no-venv" / "python"), str(tmp_path), "bfloat16", {}, 2)
    llama = run_llama_cpp(str(tmp_path / "no-build" / "llama-batched-bench"), SAMPLE, 2)

    assert "install_peers.sh vllm" in vllm["skipped"]
    assert "install_peers.sh llama_cpp" in llama["skipped"]


def test_llama_cpp_peer_runs_the_binary_and_reads_its_table(tmp_path):
    # A stand-in binary that prints the real sample: the command, the parsing and the summary
    # run as they do with llama.cpp, in milliseconds.
    binary = tmp_path / "llama-batched-bench"
    binary.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\ncat {SAMPLE}\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)

    result = run_llama_cpp(str(binary), SAMPLE, 2)

    assert result["fixed"]["output_tokens"] == 2048 and result["one_stream"]["ms_per_token"] > 0
    arguments = (tmp_path / "args").read_text().split()
    assert arguments[arguments.index("-npl") + 1] == "1,32"
    assert arguments[arguments.index("-t") + 1] == "2"


def test_peers_skip_a_model_they_cannot_load_and_a_gpu_run():
    dummy = run_peers(["vllm", "llama_cpp"], model="dummy:tiny-llama", dtype="auto",
                      workloads={}, one_stream=None)
    on_gpu = run_peers(["vllm", "llama_cpp"], model="smollm2-135m", dtype="auto",
                       workloads={}, one_stream=None, device="cuda")

    assert all("smollm2-135m only" in r["skipped"] for r in dummy.values())
    assert all("CPU baselines" in r["skipped"] for r in on_gpu.values())


def test_engine_options_are_typed():
    options = parse_engine_options(["quantization=int4", "compile=False", "kv_cache_tokens=4096",
                                    "kv_cache_memory_fraction=0.5", "cache_dir=null",
                                    "head_quantization=none"])

    assert options == dict(quantization="int4", compile=False, kv_cache_tokens=4096,
                           kv_cache_memory_fraction=0.5, cache_dir=None, head_quantization="none")
    with pytest.raises(ValueError, match="key=value"):
        parse_engine_options(["int4"])


@pytest.mark.slow  # nine spawned processes, ~1 min: each imports torch and transformers
def test_benchmark_writes_the_documented_json(tmp_path):
    path = tmp_path / "bench.json"
    main(["--model", "dummy:tiny-llama", "--num-requests", "4", "--num-fixed-requests", "2",
          "--one-stream-tokens", "8", "--dtype", "float32",
          "--engine-option", "enable_prefix_caching=false",
          "--baselines", "hf_sequential,hf_static,hf_generate_batch,vllm,llama_cpp",
          "--hf-sequential-requests", "2", "--json", str(path)])
    report = json.loads(path.read_text())
    assert set(report["results"]) == {"genq", "hf_sequential", "hf_static", "hf_generate_batch"}
    for result in report["results"].values():
        assert set(result) >= {"output_tokens", "seconds", "output_tok_s", "peak_rss_mb"}
        assert result["output_tokens"] > 0
    assert set(report["ratios"]) == {"vs_hf_sequential", "vs_hf_static", "vs_hf_generate_batch"}
    assert report["fixed_length"]["ratio"] > 0
    # 7 decode tokens of a tiny model: their time is within a loaded machine's noise, so only
    # the figure's presence is checked here, not its sign.
    assert report["one_stream"]["genq"]["output_tokens"] == 7
    assert "ms_per_token" in report["one_stream"]["genq"]
    assert report["workload"]["engine_options"] == {"enable_prefix_caching": False}
    assert report["cpu"]["model_name"] and "avx2" in report["cpu"]["flags"]
    assert set(report["peers"]) == {"vllm", "llama_cpp"}  # skipped: dummy weights
    assert "vs_vllm" not in report and "vs_llama_cpp" not in report


@pytest.mark.slow  # spawned processes, each importing torch
def test_a_variant_is_measured_against_genq_without_it_in_the_same_run(tmp_path):
    path = tmp_path / "bench.json"
    main(["--model", "dummy:tiny-llama", "--num-requests", "3", "--num-fixed-requests", "2",
          "--one-stream-tokens", "4", "--dtype", "float32", "--baselines", "none",
          "--engine-option", "enable_prefix_caching=false",
          "--variant", "max_num_seqs=1", "--variant-rounds", "2", "--json", str(path)])
    variant = json.loads(path.read_text())["variant"]
    assert variant["options"] == {"max_num_seqs": 1}
    for workload in ("mixed", "fixed"):
        figures = variant[workload]
        assert len(figures["genq"]) == len(figures["variant"]) == 2
        assert all(rate > 0 for rate in figures["genq"] + figures["variant"])
        ratios = [v / g for v, g in zip(figures["variant"], figures["genq"], strict=True)]
        assert figures["median_ratio"] == pytest.approx(statistics.median(ratios), abs=0.01)


def test_decode_attention_benchmark_reports_the_kernel_beside_a_streaming_read(tmp_path):
    from benchmarks.decode_attention import main as decode_attention

    path = tmp_path / "attention.json"
    report = decode_attention(["--batches", "1,2", "--context", "40", "--json", str(path)])
    assert json.loads(path.read_text()) == report
    assert report["stream_read_gb_s"] > 0
    assert [row["batch"] for row in report["kernel"]] == [1, 2]
    assert all(row["ns_per_position"] > 0 and row["kv_gb_s"] > 0 for row in report["kernel"])
