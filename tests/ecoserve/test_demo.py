"""The main job (`ecoserve demo`) on the bundled sample: annotate, simulate, report."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from ecoserve_sched import demo
from ecoserve_sched.cli import app
from ecoserve_sched.trace import read_trace


def test_sample_is_a_real_trace_with_prompts() -> None:
    tr = read_trace(demo.SAMPLE)
    assert len(tr) == 1500 and tr.prompts is not None and all(isinstance(p, str) and p for p in tr.prompts)
    assert np.all(np.diff(tr.arrival_s) >= 0) and tr.output_tokens.min() >= 1


def test_demo_writes_report_and_tables(tmp_path) -> None:
    res = demo.run_demo(tmp_path, policies=["vllm", "ecoserve"], rate_scales=[0.3, 0.5], headroom_profile=None)
    assert res.annotate["rows_out"] == 1500 and res.annotate["rows_rejected"] == 0
    q = res.predictor
    assert np.asarray(q["confusion"]).sum() == 1500 and 0 < q["bucket_accuracy"] < 1
    assert {r["policy"] for r in res.rows} == {"vllm", "ecoserve"} and len(res.rows) == 4
    assert all(r["finished"] == 1500 for r in res.rows)
    caps = {c["policy"]: c for c in res.capacity}
    assert caps["vllm"]["x_vllm"] == 1.0 and caps["ecoserve"]["max_rate_scale"] > 0
    # the sustained capacity: a stricter criterion over the same search, never above the plain one
    for c in caps.values():
        assert 0 < c["sustained_rate_scale"] <= c["max_rate_scale"]
    assert caps["vllm"]["sustained_x_vllm"] == 1.0 and res.headroom is None
    for name in ("report.md", "results.json", "table.md", "confusion.png", "latency_vs_load.png",
                 "slo_vs_load.png", "kv_util_over_time.png", "trace.annotated.jsonl.gz"):
        assert (tmp_path / name).stat().st_size > 0, name
    report = (tmp_path / "report.md").read_text()
    assert "Capacity" in report and "![confusion matrix](confusion.png)" in report
    assert "second server" not in report  # without one (was: "the second server's 0.0 s")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["predictor"]["requests"] == 1500
    assert results["annotate"]["output"] == str(tmp_path / "trace.annotated.jsonl.gz")  # was: the temporary folder


def test_demo_without_matplotlib_writes_the_report_without_plots(tmp_path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the base install: import matplotlib fails
    res = demo.run_demo(tmp_path, policies=["vllm"], rate_scales=[0.3], headroom_profile=None)
    assert not list(tmp_path.glob("*.png")) and all(f.suffix != ".png" for f in res.files)
    report = (tmp_path / "report.md").read_text()
    assert "png" not in report and "(No plots: matplotlib is not installed" in report


def test_demo_cli_says_where_the_report_is(tmp_path) -> None:
    """By default the demo runs the paper's baseline too: the ceiling and the ratio to vLLM V0
    in the terminal table and in the report."""
    r = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--rate-scales", "0.4"])
    assert r.exit_code == 0, r.output
    assert "report written to" in r.output and "capacity" in r.output
    assert "vllm-v0" in r.output and "ceiling" in r.output  # the terminal table (rich wraps headers)
    caps = {c["policy"]: c for c in json.loads((tmp_path / "results.json").read_text())["capacity"]}
    assert set(caps) == set(demo.POLICIES) and "vllm-v0" in caps
    assert caps["vllm-v0"]["x_vllm_v0"] == 1.0 and caps["ecoserve"]["x_vllm_v0"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "| vllm-v0 |" in report and "sustained load (/ ceiling)" in report
    # the second regime: the same requests where the KV cache is no constraint
    head = json.loads((tmp_path / "results.json").read_text())["headroom"]
    assert head["profile"] == demo.HEADROOM_PROFILE and {c["policy"] for c in head["capacity"]} == set(demo.POLICIES)
    reading = f"On `{demo.HEADROOM_PROFILE}` vLLM V1 already keeps up with"
    assert f"## The same requests on `{demo.HEADROOM_PROFILE}`" in report and reading in report
    flat = " ".join(r.output.split())
    assert "4/4 the same capacities on llama3-8b-h200" in flat
    # the terminal says what the report says: the ceilings, the two regimes, what `errors` counts
    assert reading in flat and "(the first server)" in flat and "saturation ceiling x" in flat
    assert "`vllm-v0` ignores a prompt longer than its `max_model_len`, as vLLM V0 did" in flat and "`errors`:" in report
    # progress lines stay whole on a piped stderr (was: wrapped at 80 columns)
    assert ("2/4 simulate vllm-v0, vllm, ecoserve, ecoserve-oracle at load x0.4 on llama2-13b-a100-80gb"
            in r.output.splitlines())


def test_demo_refuses_bad_inputs_before_any_work(tmp_path) -> None:
    """A bad profile or sample is named at once (not after annotating 1,500 prompts), by its own
    name (not a temporary file's), and nothing is written."""
    import re

    import pytest

    from ecoserve_sched.cost_model import ProfileError
    from ecoserve_sched.trace import TraceError

    out = tmp_path / "out"
    with pytest.raises((ProfileError, ValueError), match="nosuch"):
        demo.run_demo(out, profile="nosuch")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(TraceError, match=rf"^{re.escape(str(empty))}: trace has no rows"):
        demo.run_demo(out, sample=empty)
    no_prompt = tmp_path / "t.csv"  # an empty cell is no prompt: named FILE:LINE before annotating
    no_prompt.write_text("arrival_time_s,input_tokens,output_tokens,prompt\n0,100,10,hello\n1,200,10,\n")
    with pytest.raises(demo.DemoError, match=rf"^{re.escape(str(no_prompt))}:3: neither field"):
        demo.run_demo(out, sample=no_prompt)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "t.csv"]


def test_demo_says_it_replaced_a_traces_predictions(tmp_path) -> None:
    """An annotated trace given to the demo: its rl_* values are replaced, and it says so
    (was: only results.json recorded it)."""
    import gzip

    lines = gzip.decompress(demo.SAMPLE.read_bytes()).decode().splitlines()[:60]
    rows = [{**json.loads(x), "rl_bucket": 0, "rl_pred_tokens": 10, "rl_reserve_tokens": 20} for x in lines]
    for row in rows[:7]:  # rows the shipped bundle, which takes the served model, predicts as "unknown"
        del row["generator"]
    trace = tmp_path / "annotated.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "d"
    r = CliRunner().invoke(app, ["demo", "--trace", str(trace), "--out", str(out), "--policies", "vllm",
                                 "--rate-scales", "0.5", "--no-headroom"])
    assert r.exit_code == 0, r.output
    assert "60 row(s) of the trace already had rl_* fields" in " ".join(r.output.split())
    assert "7 row(s) have no generator: this bundle takes the served model's name" in " ".join(r.output.split())  # was: not said
    assert "60 already had `rl_*` fields" in (out / "report.md").read_text()


def test_the_table_says_how_a_sustained_search_ended():
    """A sustained search that stopped short, or found no load, was shown as its lower end or
    "-" with no word: the table says "L to U", "> L" or "< U" as for the other column."""
    from ecoserve_sched.demo import capacity_table

    def cap(search: dict) -> dict:
        return {"policy": "p", "max_rate_scale": 0.5, "search": "found", "converged": True,
                "sustained_rate_scale": search["max_rate_scale"], "sustained_search": search}

    short = {"search": "found", "converged": False, "max_rate_scale": 0.4, "lower_bound": 0.4, "upper_bound": 0.45}
    none = {"search": "no_passing_load", "converged": False, "max_rate_scale": None, "lower_bound": None,
            "upper_bound": 0.004}
    done = {"search": "found", "converged": True, "max_rate_scale": 0.401, "lower_bound": 0.401, "upper_bound": 0.405}
    rows = [capacity_table([cap(s)], explain=False).splitlines()[2] for s in (short, none, done)]
    assert "| 0.400 to 0.450 (-) |" in rows[0] and "| < 0.004 (-) |" in rows[1] and "| 0.401 (-) |" in rows[2]


def test_the_ceiling_line_says_what_the_ceiling_is() -> None:
    """A flood that never saturated the server gives a lower bound (was: "no policy sustains a
    load above it" under loads 500,000x higher), and a sustained load above a short trace's
    ceiling is said (was: the same sentence under it; a reviewer's finds)."""
    plain = [{"ceiling_rate_scale": 2.0, "sustained_vs_ceiling": 0.8}]
    assert demo.ceiling_line(plain) == "saturation ceiling x2.000: no policy sustains a load above it"
    above = [{"ceiling_rate_scale": 2.0, "sustained_vs_ceiling": 1.03}]
    assert demo.ceiling_line(above).startswith("saturation ceiling x2.000; here a sustained load is above it")
    bound = [{"ceiling_rate_scale": 2.0, "ceiling_lower_bound": "the server kept up", "sustained_vs_ceiling": 9}]
    assert demo.ceiling_line(bound) == ("saturation ceiling at least x2.000 (the server kept up): "
                                        "each / ceiling is an upper bound")
    row = {"policy": "vllm", "max_rate_scale": 1.0, "search": "found", "converged": True, **bound[0]}
    assert "at least x2.000" in demo.capacity_table([row]) and demo.ceiling_line([{}]) is None


def test_the_capacity_table_is_never_cropped(tmp_path, monkeypatch) -> None:
    """Columns as wide as their figures could pass 80 columns, and Rich cropped the right edge
    and cut headers mid-word (a reviewer's find): the table is printed as wide as it needs."""
    (tmp_path / "table.md").write_text("t\n")
    cap = {"search": "found", "converged": False, "max_rate_scale": 10.4, "upper_bound": 12.8,
           "ceiling_rate_scale": 0.5, "vs_ceiling": 20.8, "x_vllm": 1.37, "x_vllm_v0": 21.40,
           "sustained_vs_ceiling": 18.2, "sustained_x_vllm": 1.25}
    res = demo.DemoResult(out=tmp_path, annotate={"rows_replaced": 0}, rows=[{"profile": "p"}],
                          predictor={"bucket_accuracy": .5, "within_1_bucket": .8, "mae_tokens": 100,
                                     "reserve_coverage": .9}, files=[tmp_path / "report.md"],
                          capacity=[{**cap, "policy": p} for p in ("vllm", "ecoserve-oracle")])
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: res)
    monkeypatch.setenv("COLUMNS", "80")
    for names in (("vllm", "ecoserve-oracle"), ("orca", "sjf")):  # (names shorter than the header too)
        res.capacity = [{**cap, "policy": p} for p in names]
        r = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--no-headroom"])
        assert r.exit_code == 0, r.output
        row = next(line for line in r.output.splitlines() if line.startswith(f"│ {names[1]} "))
        assert "10.400 to 12.800" in row and row.rstrip().endswith("1.25 │"), row
        assert "sustained" in r.output and "sustaine " not in r.output and "sustaine\n" not in r.output
