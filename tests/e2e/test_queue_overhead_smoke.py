"""The queue-overhead benchmark still runs end to end (a few jobs, a tiny dummy model), and its
real-engine ratios compare each system run with the offline runs on either side of it."""

from __future__ import annotations

import json

import pytest

from benchmarks.queue_overhead import main, ratios_to_offline
from tests.conftest import MODEL_CACHE_DIR, REDIS_URL, TINY_MODEL


def test_each_system_run_is_compared_with_the_offline_runs_around_it():
    runs = [{"name": "offline", "seconds": 10.0}, {"name": "system", "seconds": 12.0},
            {"name": "offline", "seconds": 14.0}, {"name": "system_bulk", "seconds": 16.0},
            {"name": "offline", "seconds": 18.0}]
    assert ratios_to_offline(runs, "system") == [1.0]  # (10 + 14) / 2 / 12
    assert ratios_to_offline(runs, "system_bulk") == [1.0]  # (14 + 18) / 2 / 16


@pytest.mark.slow  # three workers start (plain Celery, echo, tiny model): ~1 min
def test_benchmark_writes_the_documented_json(redis_url, tmp_path):
    path = tmp_path / "bench.json"
    broker = REDIS_URL.rsplit("/", 1)[0] + "/13"  # the benchmark flushes its broker database
    main(["--num-jobs", "20", "--latency-samples", "3", "--broker-url", broker,
          "--model-cache-dir", MODEL_CACHE_DIR, "--engine-model", TINY_MODEL,
          "--engine-prompts", "6", "--engine-max-tokens", "4", "--engine-rounds", "1",
          "--producers", "4", "--json", str(path)])
    report = json.loads(path.read_text())
    results = report["results"]
    for name in ("plain_celery", "plain_celery_sequential", "genq_echo", "genq_echo_sequential",
                 "genq_echo_bulk"):
        assert results[name]["jobs"] == 20 and results[name]["jobs_per_s"] > 0
    assert report["producers"] == 4
    assert results["plain_celery"]["producers"] == results["genq_echo"]["producers"] == 4
    assert results["genq_echo_sequential"]["producers"] == 1
    assert results["idle_submit_to_start"]["p50_ms"] > 0
    runs = results["engine_runs"]
    assert [run["name"] for run in runs] == ["offline", "system", "offline", "system_bulk",
                                              "offline"]
    for run in runs:
        assert run["output_tokens"] > 0 and run["seconds"] > 0
    for run in runs[1::2]:  # the system runs: every job finished through the worker's engine
        assert run["jobs"] == 6 and run["engine_steps"] > 0
    ratios = report["ratios"]
    assert ratios["system_vs_engine_offline_per_round"] == ratios_to_offline(runs, "system")
    assert ratios["system_bulk_vs_engine_offline"] == ratios_to_offline(runs, "system_bulk")[0]
    assert ratios["genq_echo_bulk_vs_plain_celery"] > 0
