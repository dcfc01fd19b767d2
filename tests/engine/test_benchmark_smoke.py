"""The throughput benchmark still runs end to end (a few requests on a tiny dummy model)."""

from __future__ import annotations

import json

import pytest

from benchmarks.engine_throughput import main


@pytest.mark.slow  # eight spawned processes, ~1 min: each imports torch and transformers
def test_benchmark_writes_the_documented_json(tmp_path):
    path = tmp_path / "bench.json"
    main(["--model", "dummy:tiny-llama", "--num-requests", "4", "--dtype", "float32",
          "--baselines", "hf_sequential,hf_static,hf_generate_batch",
          "--hf-sequential-requests", "2", "--json", str(path)])
    report = json.loads(path.read_text())
    assert set(report["results"]) == {"genq", "hf_sequential", "hf_static", "hf_generate_batch"}
    for result in report["results"].values():
        assert set(result) >= {"output_tokens", "seconds", "output_tok_s", "peak_rss_mb"}
        assert result["output_tokens"] > 0
    assert set(report["ratios"]) == {"vs_hf_sequential", "vs_hf_static", "vs_hf_generate_batch"}
    assert report["fixed_length"]["ratio"] > 0
