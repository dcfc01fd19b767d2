"""benchmarks/autoscale_sim.py on a short bursty trace: its report's shape, and an autoscaled
fleet that serves the spike on fewer worker-minutes than a fixed fleet sized for the peak."""

from __future__ import annotations

import json

import benchmarks.autoscale_sim as sim
import genq.autoscaling

SHORT_TRACE = ["--minutes", "20", "--spike-start-minute", "3", "--spike-minutes", "3",
               "--interactive-per-second", "1", "--bulk-per-second", "10"]


def test_autoscaled_fleet_uses_fewer_worker_minutes_than_a_fixed_peak_fleet(tmp_path, capsys):
    # Given a short trace: steady interactive jobs and a 3-minute spike of bulk jobs
    path = tmp_path / "autoscale.json"

    # When the simulation replays it against both fleets
    report = sim.main([*SHORT_TRACE, "--json", str(path)])

    # Then the table is printed, the JSON written, and both fleets reported in full
    printed = capsys.readouterr().out
    assert "autoscaled" in printed and "fixed (peak)" in printed
    assert json.loads(path.read_text()) == report
    assert report["config"]["worker_tokens_per_second"] > 0
    assert "results-engine-throughput" in report["config"]["worker_tokens_per_second_source"]
    autoscaled, fixed = report["fleets"]
    assert [autoscaled["name"], fixed["name"]] == ["autoscaled", "fixed (peak)"]
    for fleet in (autoscaled, fixed):
        assert fleet["jobs"] == autoscaled["jobs"] > 0
        assert fleet["interactive_wait_p95_s"] >= fleet["interactive_wait_p50_s"] >= 0
        assert len(fleet["workers_by_minute"]) >= 20
    assert fixed["max_workers"] == report["config"]["fixed_workers"] >= 2

    # And scaling by genq's signals costs fewer worker-minutes, scaling up for the spike
    assert autoscaled["worker_minutes"] < fixed["worker_minutes"]
    assert max(autoscaled["workers_by_minute"][3:8]) > autoscaled["workers_by_minute"][-1]


def test_the_simulated_scaler_uses_the_formula_of_the_metrics():
    assert sim.scaling_signal is genq.autoscaling.scaling_signal


def test_a_given_worker_speed_replaces_the_engine_results(tmp_path):
    report = sim.main([*SHORT_TRACE, "--worker-tokens-per-second", "500",
                       "--json", str(tmp_path / "out.json")])
    assert report["config"]["worker_tokens_per_second"] == 500
    assert report["config"]["worker_tokens_per_second_source"] == "--worker-tokens-per-second"
