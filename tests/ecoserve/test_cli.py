"""The ecoserve CLI on a tiny trace: simulate --json, capacity, compare, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from ecoserve_sched.cli import app

FIXTURE = str(Path(__file__).parent / "fixtures" / "confusion_sharegpt.json")
runner = CliRunner()


def _trace(tmp_path, n=60):
    rows = "".join(f"{i * 0.5},{200 + 37 * (i % 7)},{20 + 53 * (i % 5)}\n" for i in range(n))
    p = tmp_path / "t.csv"
    p.write_text("arrival_time_s,input_tokens,output_tokens\n" + rows)
    return str(p)


def test_simulate_json_has_the_required_fields(tmp_path):
    r = runner.invoke(app, ["simulate", "--trace", _trace(tmp_path), "--policy", "ecoserve",
                            "--confusion", FIXTURE, "--profile", "llama2-7b-a100-80gb", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    for k in ("policy", "requests", "finished", "throughput_rps", "throughput_tok_s", "mean_jct_s",
              "p50_ttft_s", "p99_ttft_s", "p50_tbt_s", "p99_tbt_s", "slo_attainment", "goodput_rps",
              "preemptions", "kv_util_mean", "sched_us_per_iter", "predictions"):
        assert k in s
    assert s["requests"] == s["finished"] == 60 and s["predictions"].startswith("confusion")


def test_capacity_and_compare(tmp_path):
    r = runner.invoke(app, ["capacity", "--trace", _trace(tmp_path), "--policy", "vllm",
                            "--predictions", "oracle", "--profile", "llama2-7b-a100-80gb",
                            "--slo-ttft", "2", "--slo-tbt", "0.1", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["max_rate_scale"] > 0
    out = tmp_path / "cmp"
    r = runner.invoke(app, ["compare", "--trace", _trace(tmp_path), "--policies", "vllm,ecoserve",
                            "--rate-scales", "1,4", "--out", str(out), "--confusion", FIXTURE,
                            "--profile", "llama2-7b-a100-80gb"])
    assert r.exit_code == 0, r.output
    assert "| vllm |" in (out / "table.md").read_text()
    assert (out / "slo_vs_load.png").exists() and (out / "kv_util_over_time.png").exists()


def test_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("arrival_time_s,input_tokens,output_tokens\n0,1,1\n0,x,1\n")
    r = runner.invoke(app, ["simulate", "--trace", str(bad)])
    assert r.exit_code == 2 and "bad.csv:3" in r.output
    r = runner.invoke(app, ["simulate", "--trace", _trace(tmp_path), "--policy", "nope",
                            "--predictions", "oracle"])
    assert r.exit_code == 2 and "unknown policy" in r.output
