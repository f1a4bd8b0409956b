"""The ecoserve CLI on a tiny trace: results, strict JSON, honest capacity, one-line errors,
options checked by name, safe outputs (atomic, never an input, replaced only with --force)."""

from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ecoserve_sched import compare as compare_mod
from ecoserve_sched.cli import app
from ecoserve_sched.cost_model import load_profile
from rlpredict.outputs import OWNER_FILE

FIXTURE = str(Path(__file__).parent / "fixtures" / "confusion_sharegpt.json")
PROFILE = ["--profile", "llama2-7b-a100-80gb"]
runner = CliRunner()


def _trace(tmp_path: Path, n: int = 60, name: str = "t.csv") -> str:
    rows = "".join(f"{i * 0.5},{200 + 37 * (i % 7)},{20 + 53 * (i % 5)}\n" for i in range(n))
    p = tmp_path / name
    p.write_text("arrival_time_s,input_tokens,output_tokens\n" + rows)
    return str(p)


def _strict(text: str) -> object:
    """Parse JSON, refusing NaN and Infinity (not JSON)."""
    def refuse(c: str) -> None:
        raise ValueError(f"bare {c} in JSON output")
    return json.loads(text, parse_constant=refuse)


def _refused(r, *fragments: str) -> None:
    """Exit 2, no traceback, and the message names what is wrong."""
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output
    flat = " ".join(r.output.replace("│", " ").split())
    for f in fragments:
        assert f in flat, (f, r.output)


def test_simulate_json_has_the_required_fields(tmp_path):
    r = runner.invoke(app, ["simulate", "--trace", _trace(tmp_path), "--policy", "ecoserve",
                            "--confusion", FIXTURE, *PROFILE, "--json"])
    assert r.exit_code == 0, r.output
    s = _strict(r.stdout)
    for k in ("policy", "requests", "finished", "throughput_rps", "throughput_tok_s", "mean_jct_s",
              "p50_ttft_s", "p99_ttft_s", "p50_tbt_s", "p99_tbt_s", "slo_attainment", "goodput_rps",
              "preemptions", "kv_util_mean", "sched_us_per_iter", "predictions"):
        assert k in s
    assert s["requests"] == s["finished"] == 60 and s["predictions"].startswith("confusion")


def test_simulate_json_is_strict_when_nothing_finishes(tmp_path):
    huge = tmp_path / "huge.csv"
    huge.write_text("arrival_time_s,input_tokens,output_tokens\n0,100000000,50\n")
    r = runner.invoke(app, ["simulate", "--trace", str(huge), "--predictions", "oracle", "--json"])
    assert r.exit_code == 0, r.output
    s = _strict(r.stdout)  # was a bare NaN
    assert s["finished"] == 0 and s["dropped"] == 1 and s["slo_attainment"] == 0.0
    assert s["throughput_rps"] is None and s["mean_jct_s"] is None
    r = runner.invoke(app, ["simulate", "--trace", str(huge), "--predictions", "oracle"])
    assert r.exit_code == 0 and "n/a" in r.output and "nan" not in r.output


def test_capacity_and_compare(tmp_path):
    r = runner.invoke(app, ["capacity", "--trace", _trace(tmp_path), "--policy", "vllm",
                            *PROFILE, "--slo-ttft", "2",
                            "--slo-tbt", "0.03", "--json"])
    assert r.exit_code == 0, r.output
    c = _strict(r.stdout)
    assert c["search"] == "found" and c["lower_bound"] == c["max_rate_scale"] > 0
    assert c["upper_bound"] > c["max_rate_scale"] and c["note"] is None
    out = tmp_path / "cmp"
    r = runner.invoke(app, ["compare", "--trace", _trace(tmp_path), "--policies", "vllm,ecoserve",
                            "--rate-scales", "1,4", "--out", str(out), "--confusion", FIXTURE, *PROFILE])
    assert r.exit_code == 0, r.output
    assert "| vllm |" in (out / "table.md").read_text()
    assert (out / "slo_vs_load.png").exists() and (out / "kv_util_over_time.png").exists()
    assert len(_strict((out / "results.json").read_text())) == 4
    assert (out / OWNER_FILE).is_file()


def test_compare_without_matplotlib_writes_results_and_says_so(tmp_path, monkeypatch):
    """The base install has no matplotlib: the results and the table, no plots, one line
    (was: every simulation run, then a ModuleNotFoundError and nothing written)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    out = tmp_path / "cmp"
    r = runner.invoke(app, ["compare", "--trace", _trace(tmp_path), "--policies", "vllm", "--rate-scales", "1",
                            "--out", str(out), *PROFILE])
    assert r.exit_code == 0, r.output
    assert "matplotlib is not installed: no plots" in r.output
    assert sorted(p.name for p in out.iterdir()) == sorted(["results.json", "table.md", OWNER_FILE])


def test_capacity_says_when_the_search_finds_no_limit(tmp_path):
    """A load the server never fails is no capacity (was: the search limit, 4096)."""
    light = tmp_path / "two.csv"
    light.write_text("arrival_time_s,input_tokens,output_tokens\n0,100,50\n1,100,50\n")
    r = runner.invoke(app, ["capacity", "--trace", str(light), "--predictions", "oracle", "--json"])
    assert r.exit_code == 0, r.output
    c = _strict(r.stdout)
    assert c["max_rate_scale"] is None and c["search"] == "no_failing_load"
    assert c["upper_bound"] is None and c["lower_bound"] == max(p["rate_scale"] for p in c["probes"])
    assert "too small or too light" in c["note"]
    one = tmp_path / "one.csv"
    one.write_text("arrival_time_s,input_tokens,output_tokens\n0,100,50\n")
    r = runner.invoke(app, ["capacity", "--trace", str(one), "--predictions", "oracle"])
    assert r.exit_code == 0 and "no capacity found" in r.output and "same time" in r.output
    r = runner.invoke(app, ["capacity", "--trace", str(one), "--predictions", "oracle", "--json"])
    c = _strict(r.stdout)
    assert c["search"] == "load_independent" and len(c["probes"]) == 1
    r = runner.invoke(app, ["capacity", "--trace", _trace(tmp_path), "--predictions", "oracle",
                            "--slo-ttft", "1e-6", "--json"])
    c = _strict(r.stdout)
    assert c["max_rate_scale"] is None and c["search"] == "no_passing_load"
    assert c["upper_bound"] == min(p["rate_scale"] for p in c["probes"])
    # requests longer than the whole KV cache, dropped at every load, cap attainment below the
    # target: no load can meet it, said after one run (was: halved 8 times to "below x0.0039")
    big = tmp_path / "big.csv"
    big.write_text("arrival_time_s,input_tokens,output_tokens\n" + "".join(
        f"{i * 0.5},{100 if i % 8 else 200_000},50\n" for i in range(40)))
    r = runner.invoke(app, ["capacity", "--trace", str(big), "--predictions", "oracle", "--no-ceiling", "--json"])
    c = _strict(r.stdout)
    assert (c["search"], c["dropped"], len(c["probes"])) == ("unattainable", 5, 1)
    assert "5 of 40 requests are longer than the whole KV cache" in c["note"]
    assert "so SLO attainment is at most 0.875, below the target 0.9" in c["note"]
    r = runner.invoke(app, ["capacity", "--trace", str(big), "--predictions", "oracle", "--no-ceiling",
                            "--max-normalized-latency", "1"])
    assert r.exit_code == 0 and "the normalized-latency criterion needs every request finished" in r.output.replace("\n", " ")


def test_options_that_would_be_ignored_are_refused(tmp_path):
    t = _trace(tmp_path, 5)
    _refused(runner.invoke(app, ["capacity", "--trace", t, "--predictions", "oracle", "--target", "0.5",
                                 "--max-normalized-latency", "0.1"]), "'--target'", "pass one of the two")
    annotated = tmp_path / "a.jsonl"
    annotated.write_text(json.dumps({"arrival_time_s": 0, "input_tokens": 5, "output_tokens": 3, "rl_bucket": 0,
                                     "rl_pred_tokens": 3, "rl_reserve_tokens": 4}) + "\n")
    _refused(runner.invoke(app, ["simulate", "--trace", str(annotated), "--confusion", FIXTURE]),
             "'--confusion'", "rl_* fields")
    r = runner.invoke(app, ["simulate", "--trace", str(annotated), "--confusion", FIXTURE,
                            "--predictions", "confusion"])
    assert r.exit_code == 0, r.output


def test_predictions_no_policy_reads_are_refused_in_capacity_and_compare(tmp_path):
    t = _trace(tmp_path, 5)
    _refused(runner.invoke(app, ["capacity", "--trace", t, "--policy", "ecoserve-oracle", "--predictions",
                                 "oracle"]), "'--predictions'", "ecoserve-oracle always runs on oracle")
    _refused(runner.invoke(app, ["compare", "--trace", t, "--policies", "ecoserve-oracle,vllm-real",
                                 "--confusion", FIXTURE, "--out", str(tmp_path / "o")]),
             "'--confusion'", "vllm-real reads no predictions")
    r = runner.invoke(app, ["compare", "--trace", t, "--policies", "ecoserve,ecoserve-oracle", "--rate-scales",
                            "1", "--confusion", FIXTURE, "--out", str(tmp_path / "o")])  # ecoserve reads them
    assert r.exit_code == 0, r.output


def test_an_unknown_policy_is_refused_before_the_trace_is_read(tmp_path):
    missing = str(tmp_path / "missing.csv")  # was: the trace was read first, then a plain error
    for command in ("simulate", "capacity"):
        _refused(runner.invoke(app, [command, "--trace", missing, "--policy", "nosuch"]),
                 "'--policy'", "unknown policy nosuch (see `ecoserve policies`)")
    _refused(runner.invoke(app, ["simulate", "--trace", missing, "--policy", "ecoserv"]),
             "unknown policy ecoserv (did you mean ecoserve? see `ecoserve policies`)")
    r = runner.invoke(app, ["policies"])
    assert r.exit_code == 0 and "\necoserve-oracle\n" in r.stdout and r.stdout.endswith("\necoserve-async-vllm-real\n")
    assert "need vLLM" in r.stderr  # the names alone on stdout, one a line (for scripts)


def test_all_dropped_reads_n_a_not_nan(tmp_path):
    """Every request longer than the KV cache: tables say n/a and the ceiling says why there is
    none (was: nan, and "rate scale nan")."""
    drop = tmp_path / "alldrop.csv"
    drop.write_text("arrival_time_s,input_tokens,output_tokens\n0,100000,10\n1,200000,10\n")
    out = tmp_path / "d"
    r = runner.invoke(app, ["compare", "--trace", str(drop), "--policies", "vllm", "--rate-scales", "1",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "nan" not in (out / "table.md").read_text() and "| n/a |" in (out / "table.md").read_text()
    r = runner.invoke(app, ["capacity", "--trace", str(drop), "--policy", "vllm"])
    assert r.exit_code == 0, r.output
    assert "nan" not in r.stdout and "saturation ceiling: none (no request finished" in r.stdout
    assert compare_mod.table_cell(float("nan")) == compare_mod.table_cell(None) == "n/a"


def test_capacity_counts_dropped_requests(tmp_path):
    t = tmp_path / "drop.csv"
    t.write_text("arrival_time_s,input_tokens,output_tokens\n0,100000,10\n1,200,10\n")
    base = ["capacity", "--trace", str(t), "--policy", "vllm", "--no-ceiling"]
    r = runner.invoke(app, base)
    assert r.exit_code == 0 and "1 of 2 requests dropped at every load" in r.stdout, r.output
    c = _strict(runner.invoke(app, [*base, "--json"]).stdout)
    assert c["dropped"] == 1 and c["requests"] == 2


def test_file_locations_and_server_options_are_named(tmp_path):
    conf = tmp_path / "neg.csv"
    conf.write_text("{\n  oops\n}")
    _refused(runner.invoke(app, ["simulate", "--trace", _trace(tmp_path, 5), "--confusion", str(conf)]),
             "neg.csv: line 2: not valid JSON")  # as a profile's or a manifest's (read_json)
    _refused(runner.invoke(app, ["simulate", "--trace", _trace(tmp_path, 5), "--predictions", "oracle",
                                 "--gpu-memory-utilization", "0.3"]), "'--gpu-memory-utilization'", "no room")


def test_user_text_is_not_rich_markup(tmp_path):
    """A file name with '[/b]' in it is printed, not parsed (was: rich's MarkupError)."""
    (tmp_path / "a[").mkdir()
    t = tmp_path / "a[" / "b].jsonl"
    t.write_text(json.dumps({"arrival_time_s": 0, "input_tokens": 5, "output_tokens": 3, "rl_bucket": 0,
                             "rl_pred_tokens": 3, "rl_reserve_tokens": 4}) + "\n")
    r = runner.invoke(app, ["simulate", "--trace", str(t)])
    assert r.exit_code == 0, r.output
    assert "ecoserve on b].jsonl x1" in r.output


def test_responses_cut_by_max_tokens_are_counted(tmp_path):
    t = tmp_path / "cap.jsonl"
    t.write_text('{"arrival_time_s": 0, "input_tokens": 5, "output_tokens": 700, "max_tokens": 10}\n'
                 '{"arrival_time_s": 1, "input_tokens": 5, "output_tokens": 7}\n')
    r = CliRunner().invoke(app, ["simulate", "--trace", str(t), "--predictions", "oracle", "--json"])
    assert r.exit_code == 0, r.output
    assert "1 rows have output_tokens above their max_tokens" in r.stderr
    assert _strict(r.stdout)["finished"] == 2


def test_a_table_says_when_requests_were_dropped(tmp_path):
    huge = tmp_path / "huge.csv"  # one prompt longer than the whole KV cache
    huge.write_text(Path(_trace(tmp_path, 5)).read_text() + "3,9000000,5\n")
    out = tmp_path / "cmp"
    r = runner.invoke(app, ["compare", "--trace", str(huge), "--policies", "vllm", "--rate-scales", "1",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    header, _, row = (out / "table.md").read_text().strip().splitlines()[-3:]
    assert header.split("|")[-2].strip() == "dropped" and row.split("|")[-2].strip() == "1"
    # so does one whose requests ended with an error (was: in results.json only)
    table = compare_mod.markdown_table([{"policy": "vllm-v0", "errors": 1}, {"policy": "vllm", "errors": 0}],
                                       ("policy",))
    assert table.splitlines()[0] == "| policy | errors |" and table.splitlines()[2] == "| vllm-v0 | 1 |"


def test_a_capacity_is_printed_as_a_load_that_reads_back():
    assert compare_mod.load_text(0.515625) == "0.515625" and compare_mod.load_text(0.5) == "0.5"
    assert compare_mod.load_text(1 / 3) == repr(1 / 3) and float(compare_mod.load_text(2.718281828)) == 2.718281828


def test_capacity_text_in_tables():
    assert compare_mod.capacity_text({"search": "found", "max_rate_scale": 0.25}) == "0.250"
    assert compare_mod.capacity_text({"search": "no_failing_load", "lower_bound": 8192.0}) == "> 8.19e+03"
    assert compare_mod.capacity_text({"search": "no_passing_load", "upper_bound": 0.004}) == "< 0.004"
    assert compare_mod.capacity_text({"search": "load_independent"}) == "n/a"
    assert compare_mod.capacity_text({"search": "found", "max_rate_scale": 0.00355}) == "0.00355"  # was 0.004
    assert compare_mod.table_cell(999.6) == "1000" and compare_mod.table_cell(12345.6) == "12346"  # was 1e+03
    assert compare_mod.table_cell(0.5) == "0.5" and compare_mod.table_cell(1e-5) == "1e-05"


def test_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("arrival_time_s,input_tokens,output_tokens\n0,1,1\n0,x,1\n")
    _refused(runner.invoke(app, ["simulate", "--trace", str(bad)]), "bad.csv:3")
    _refused(runner.invoke(app, ["simulate", "--trace", _trace(tmp_path), "--policy", "nope",
                                 "--predictions", "oracle"]), "unknown policy")
    gz = tmp_path / "t.csv.gz"
    gz.write_bytes(gzip.compress(Path(_trace(tmp_path, 2000)).read_bytes())[:3000])
    _refused(runner.invoke(app, ["simulate", "--trace", str(gz), "--predictions", "oracle"]),
             "t.csv.gz: compressed data is truncated or corrupt")


def test_debug_shows_the_traceback_and_version(tmp_path):
    args = ["simulate", "--trace", str(tmp_path / "missing.csv")]
    _refused(runner.invoke(app, args), "missing.csv: no such trace file")
    r = runner.invoke(app, ["--debug", *args])
    assert r.exit_code != 0 and isinstance(r.exception, ValueError)
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("ecoserve ")


@pytest.mark.parametrize(("args", "option"), [
    (["--max-requests", "-1"], "--max-requests"),
    (["--max-requests", "0"], "--max-requests"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--max-tokens", str(2**63)], "--max-tokens"),
    (["--slo-ttft", "nan"], "--slo-ttft"),
    (["--slo-ttft", "0"], "--slo-ttft"),
    (["--slo-tbt", "inf"], "--slo-tbt"),
    (["--slo-tbt", "-0.2"], "--slo-tbt"),
    (["--slo-deadline", "-1"], "--slo-deadline"),
    (["--rate-scale", "0"], "--rate-scale"),
    (["--rate-scale", "nan"], "--rate-scale"),
    (["--rate-scale", "abc"], "--rate-scale"),
    (["--seed", "-1"], "--seed"),
    (["--arrivals", "poisson", "--rate", "-3"], "--rate"),
    (["--arrivals", "gamma", "--rate", "2", "--cv", "inf"], "--cv"),
    (["--arrivals", "gamma", "--rate", "2", "--cv", "0"], "--cv"),
    (["--arrivals", "weibull", "--rate", "2"], "--arrivals"),
    (["--predictions", "psychic"], "--predictions"),
    # options that would be silently ignored
    (["--rate", "2"], "--arrivals"),
    (["--arrivals", "poisson"], "--rate"),
    (["--arrivals", "poisson", "--rate", "2", "--cv", "2"], "--cv"),
    (["--bundle", "models/x"], "--bundle"),
    (["--predictions", "bundle"], "--predictions"),
    (["--predictions", "annotated", "--confusion", FIXTURE], "--confusion"),
    (["--predictions", "oracle", "--confusion", FIXTURE], "--confusion"),
    # no policy run reads them (was: ignored, or switched to oracle, silently)
    (["--policy", "ecoserve-oracle", "--confusion", FIXTURE], "--confusion"),
    (["--policy", "ecoserve-oracle", "--predictions", "confusion"], "--predictions"),
    (["--policy", "vllm-real", "--predictions", "confusion"], "--predictions"),  # was: reported "none"
    (["--policy", "vllm", "--confusion", FIXTURE], "--confusion"),  # FCFS reads none: was ignored unsaid
    (["--policy", "orca", "--predictions", "oracle"], "--predictions"),
    (["--policy", "vllm-real", "--confusion", FIXTURE], "--confusion"),
    (["--policy", "vllm,sjf"], "--policy"),
])
def test_simulate_options_are_checked_by_name(tmp_path, args, option):
    _refused(runner.invoke(app, ["simulate", "--trace", _trace(tmp_path, 5), *args]), f"'{option}'")


def test_synthetic_arrivals_and_overflowing_scales(tmp_path):
    t = _trace(tmp_path, 5)
    r = runner.invoke(app, ["simulate", "--trace", t, "--predictions", "oracle", "--arrivals", "gamma",
                            "--rate", "2", "--cv", "3", "--json"])
    assert r.exit_code == 0 and _strict(r.stdout)["finished"] == 5
    _refused(runner.invoke(app, ["simulate", "--trace", t, "--predictions", "oracle",
                                 "--rate-scale", "1e-320"]), "past 2^36 s")
    # lengths without arrival times (docs/simulator.md: ShareGPT's) get drawn ones; the line says so
    lens = tmp_path / "lens.csv"
    lens.write_text("input_tokens,output_tokens\n10,20\n30,5\n7,7\n")
    r = runner.invoke(app, ["simulate", "--trace", str(lens), "--predictions", "oracle", "--arrivals", "poisson",
                            "--rate", "2", "--json"])
    assert r.exit_code == 0 and _strict(r.stdout)["finished"] == 3
    assert "arrival times drawn (poisson, 2 requests/s, seed 0; the file's own, if any, not read" in r.stderr
    for extra in (["--time-unit", "ms"], ["--columns", "arrival_time_s=t"]):  # they would do nothing
        _refused(runner.invoke(app, ["simulate", "--trace", str(lens), "--predictions", "oracle", "--arrivals",
                                     "poisson", "--rate", "2", *extra]), "'--arrivals'", "is not read")
    _refused(runner.invoke(app, ["simulate", "--trace", str(lens), "--predictions", "oracle"]), "--arrivals poisson")


@pytest.mark.parametrize(("args", "option", "why"), [
    (["--rate-scales", "1,abc"], "--rate-scales", "'abc' is not a number"),
    (["--rate-scales", "1,-2"], "--rate-scales", "in (0, 1e+06]"),
    (["--rate-scales", "1,1e308"], "--rate-scales", "in (0, 1e+06]"),  # was: a plot's error after the runs
    (["--rate-scales", "nan"], "--rate-scales", "is not a number"),
    (["--rate-scales", "1,1"], "--rate-scales", "twice"),
    (["--policies", ","], "--policies", "at least one"),
    (["--policies", "vllm,vllm"], "--policies", "twice"),
    (["--policies", ",vllm,,ecoserve"], "--policies", "an empty name"),  # was: dropped unsaid
    (["--rate-scales", "1,"], "--rate-scales", "is not a number"),
])
def test_compare_lists_are_checked(tmp_path, args, option, why):
    r = runner.invoke(app, ["compare", "--trace", _trace(tmp_path, 5), "--predictions", "oracle",
                            "--out", str(tmp_path / "o"), *args])
    _refused(r, f"'{option}'", why)
    assert not (tmp_path / "o").exists()


def test_compare_output_is_safe(tmp_path):
    t = _trace(tmp_path, 5)
    out = tmp_path / "o"
    base = ["compare", "--trace", t, "--policies", "sjf", "--predictions", "oracle",
            "--rate-scales", "1", "--out", str(out)]
    assert runner.invoke(app, base).exit_code == 0
    first = (out / "results.json").read_text()
    again = runner.invoke(app, base)
    _refused(again, "exists; pass --force")
    assert "read " not in again.output  # refused before the trace is read (was: after, however large)
    assert runner.invoke(app, [*base, "--force", "--seed", "3"]).exit_code == 0
    assert (out / "results.json").read_text() != first
    (out / "notes.txt").write_text("mine")
    _refused(runner.invoke(app, [*base, "--force"]), "no tool of ours wrote")
    assert (out / "notes.txt").read_text() == "mine"
    _refused(runner.invoke(app, [*base[:-1], str(tmp_path), "--force"]), "holds the input")
    _refused(runner.invoke(app, [*base[:-1], t, "--force"]), "also an input")
    assert Path(t).is_file()
    bundle = tmp_path / "bundle"  # nor inside a bundle it reads (was: written into it)
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    mixed = ["compare", "--trace", t, "--policies", "sjf", "--rate-scales", "1"]
    for opt, pred in (("--confusion", "confusion"), ("--bundle", "bundle")):
        _refused(runner.invoke(app, [*mixed, "--predictions", pred, opt, str(bundle), "--out", str(bundle / "o")]),
                 "--out lies inside the input")
    assert [q.name for q in bundle.iterdir()] == ["manifest.json"]
    # a refused run leaves nothing: no folder, no temporary folder; every name is checked before
    # any policy runs (was: vllm ran, then "nope" failed, and the message named no option)
    fresh = tmp_path / "fresh"
    r = runner.invoke(app, ["compare", "--trace", t, "--predictions", "oracle", "--policies",
                            "vllm,nope", "--rate-scales", "1", "--out", str(fresh)])
    _refused(r, "--policies", "unknown policy nope")
    _refused(runner.invoke(app, [*base[:5], "--rate-scales", "1_0"]), "--rate-scales", "not a number")  # was: 10
    assert "attainment" not in r.output  # no progress line: nothing ran
    assert not fresh.exists() and not list(tmp_path.glob(".fresh*"))


def test_compare_interrupt_removes_the_temporary_folder(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare_mod, "sweep", interrupted)
    out = tmp_path / "o"
    r = runner.invoke(app, ["compare", "--trace", _trace(tmp_path, 5), "--predictions", "oracle",
                            "--out", str(out)])
    assert r.exit_code == 130 and "interrupted" in r.output
    assert not out.exists() and not list(tmp_path.glob(".o.*"))


def test_profile_files_are_checked(tmp_path):
    t = _trace(tmp_path, 5)
    p = tmp_path / "p.json"
    p.write_text('{"model": {\n  "hidden": 1,,\n}}')
    _refused(runner.invoke(app, ["simulate", "--trace", t, "--predictions", "oracle", "--profile", str(p)]),
             "p.json: line 2: not valid JSON")
    spec = json.loads((Path(compare_mod.__file__).parent / "profiles" / "calibrated"
                       / "small-llama-transformers-cpu.json").read_text())
    for edit, why in ((lambda s: s.update(gpu_memory_utilization=2), "gpu_memory_utilization"),
                      (lambda s: s.update(token_budget=-5), "token_budget"),
                      (lambda s: s["gpu"].update(hbm_bytes=1000), "no room for a KV cache"),
                      (lambda s: s["model"].update(n_layers=0.5), "model.n_layers"),
                      (lambda s: s["model"].update(n_params=1e308), "model.n_params"),
                      (lambda s: s["gpu"].update(peak_flops=1e-300), "one-token iteration"),
                      (lambda s: s["efficiency"].update(overhead_s=1e308), "efficiency.overhead_s"),
                      (lambda s: s.update(name={"a": 1}), "field 'name'")):
        bad = json.loads(json.dumps(spec))
        edit(bad)
        p.write_text(json.dumps(bad))
        _refused(runner.invoke(app, ["simulate", "--trace", t, "--predictions", "oracle",
                                     "--profile", str(p)]), "p.json", why)
    # an empty name is not the default profile (was: the default, silently)
    _refused(runner.invoke(app, ["simulate", "--trace", t, "--profile", ""]), "--profile", "is empty")



def test_the_server_settings_size_the_kv_cache_before_a_profile_is_refused(tmp_path):
    """A profile whose own gpu_memory_utilization leaves no room runs with a
    --gpu-memory-utilization that does (was: refused as loaded, before the option applied; a
    reviewer's find). A run that drops requests says so; vllm-v0 below its context length is said."""
    t = _trace(tmp_path, 5)
    spec = load_profile("llama2-7b-a100-80gb").to_json()
    spec["gpu_memory_utilization"] = 0.15  # 12 GB of 80: the 13.5 GB of weights do not fit
    p = tmp_path / "small.json"
    p.write_text(json.dumps(spec))
    _refused(runner.invoke(app, ["simulate", "--trace", t, "--predictions", "oracle", "--profile", str(p)]),
             "no room for a KV cache")
    r = runner.invoke(app, ["simulate", "--trace", t, "--predictions", "oracle", "--profile", str(p),
                            "--gpu-memory-utilization", "0.9", "--json"])
    assert r.exit_code == 0, r.output
    long = tmp_path / "long.csv"
    long.write_text("arrival_time_s,input_tokens,output_tokens\n0,500000,10\n0.5,200,10\n")
    r = runner.invoke(app, ["simulate", "--trace", str(long), "--predictions", "oracle", *PROFILE, "--json"])
    assert r.exit_code == 0 and "note: 1 of 2 requests dropped (longer than the whole KV cache)" in r.stderr
    r = runner.invoke(app, ["simulate", "--trace", t, "--policy", "vllm-v0", *PROFILE, "--token-budget", "64", "--max-running", "8",
                            "--json"])
    assert r.exit_code == 0 and "note: vllm-v0: token budget 64 below its max_model_len 4096" in r.stderr
    _refused(runner.invoke(app, ["simulate", "--trace", t, "--predictions", "oracle", "--arrivals", "poisson",
                                 "--rate", "1e9", "--rate-scale", "2"]), "--rate-scale", "over 1e+09")
    # room for 8 tokens, not a 16-token block: the message names what binds (a reviewer's cases)
    from ecoserve_sched.cost_model import CostModel

    lo, hi = 1e9, float(spec["gpu"]["hbm_bytes"])
    spec["gpu_memory_utilization"] = 0.9
    for _ in range(100):
        spec["gpu"]["hbm_bytes"] = int((lo + hi) / 2)
        lo, hi = (spec["gpu"]["hbm_bytes"], hi) if CostModel(spec).kv_blocks(1) < 8 else (lo, spec["gpu"]["hbm_bytes"])
    spec["gpu"]["hbm_bytes"] = int(hi)
    p.write_text(json.dumps(spec))
    base = ["simulate", "--trace", t, "--predictions", "oracle", "--profile", str(p)]
    _refused(runner.invoke(app, base), "no room for a KV cache")
    _refused(runner.invoke(app, [*base, "--gpu-memory-utilization", "0.9"]), "'--block-size'",
             "block size 16: not one block", "at gpu_memory_utilization 0.9")
    assert runner.invoke(app, [*base, "--block-size", "8", "--json"]).exit_code == 0
    spec["gpu"]["hbm_bytes"] = 10 * 2**30  # less than the weights
    p.write_text(json.dumps(spec))
    _refused(runner.invoke(app, [*base, "--block-size", "4"]), "'--profile'", "no room for a KV cache at its")


@pytest.mark.parametrize("content", [b"\xff\xfe", b"[" * 100_000, b'{"format": "rlpredict.confusion/1", '
                                     b'"bucket_edges": ["x"], "point_tokens": [1], "reserve_tokens": [1], "matrix": [[1]]}'])
def test_confusion_files_are_named(tmp_path, content):
    c = tmp_path / "conf.json"
    c.write_bytes(content)
    _refused(runner.invoke(app, ["simulate", "--trace", _trace(tmp_path, 5), "--confusion", str(c)]),
             "conf.json")


def test_calibrate_checks_options_and_output_before_measuring(tmp_path):
    out = tmp_path / "p.json"
    base = ["calibrate", "--model", "tiny-llama", "--grid", "test", "--out", str(out)]
    for args, option in ((["--threads", "0"], "--threads"), (["--threads", "100000"], "--threads"),
                         (["--repeats", "0"], "--repeats"), (["--token-budget", "8"], "--token-budget"),
                         (["--engine", "vllm"], "--engine")):
        _refused(runner.invoke(app, [*base, *args]), f"'{option}'")
    _refused(runner.invoke(app, [*base, "--name", " "]), "--name: empty")  # was: the default name
    _refused(runner.invoke(app, ["simulate", "--trace", os.devnull]), "not a regular file")  # was: "no such"
    out.write_text("{}")
    _refused(runner.invoke(app, base), "exists; pass --force")
    cfg = tmp_path / "config.json"
    cfg.write_text("{}")
    _refused(runner.invoke(app, [*base[:2], str(cfg), "--out", str(cfg), "--force"]), "also an input")
    # a folder's config.json is its input too; an output under a file is refused before measuring
    _refused(runner.invoke(app, [*base[:2], str(tmp_path), "--out", str(cfg), "--force"]), "also an input")
    _refused(runner.invoke(app, [*base[:5], "--out", str(cfg / "p.json")]), "is a file, not a folder")
    # a trailing '/' names a folder to be (was: a file of that name written, a reviewer's `--out np2/`)
    _refused(runner.invoke(app, [*base[:5], "--out", f"{tmp_path / 'np2'}/"]), "ends in '/', a folder")
    assert not (tmp_path / "np2").exists()


def test_calibrate_refuses_a_missing_device(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("scipy")
    base = ["calibrate", "--model", "tiny-llama", "--out", str(tmp_path / "p.json")]
    _refused(runner.invoke(app, [*base, "--device", "tpu"]), "--device 'tpu'")
    _refused(runner.invoke(app, [*base, "--dtype", "int3"]), "--dtype 'int3'")
    if not torch.cuda.is_available():  # was: AssertionError traceback from torch
        _refused(runner.invoke(app, [*base, "--device", "cuda"]), "CUDA is not available")
    _refused(runner.invoke(app, [*base, "--device", "cuda:99"]), "--device cuda:99")
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize(("edit", "why"), [({"hidden_size": -4}, "no usable hidden_size"),
                                         ({"hidden_size": "64"}, "hidden_size"),
                                         ({"num_attention_heads": 3}, "heads"),
                                         ({"model_type": "gpt2", "bos_token_id": 0, "eos_token_id": 0}, "model type 'gpt2' is not one"),
                                         ({"model_type": "qwen2_moe", "num_experts": 60}, "mixture-of-experts"),
                                         # a misspelt size was transformers' default (32 layers)
                                         ({"num_hidden_layer": 1}, "field 'num_hidden_layers' is missing"),
                                         # OPT's name for the MLP width, not Llama's (was: 11008 built)
                                         ({"intermediate_size": None, "ffn_dim": 128}, "field 'intermediate_size' is missing"),
                                         ({"num_key_value_heads": 3}, "num_key_value_heads (3) must divide"),
                                         ({"vocab_size": 3}, "field 'vocab_size' (3) must be at least 4"),
                                         # torch's assert (was: exit 1, "a bug")
                                         ({"pad_token_id": 1000}, "Padding_idx must be within num_embeddings")])
def test_calibrate_names_a_config_transformers_cannot_build(tmp_path, edit, why):
    """Was: a RuntimeError, a strict-dataclass error or a ValueError from transformers, reported
    as a bug; what the cost model cannot describe is refused before the weights are built (a
    mixture-of-experts config took 40 s and 9 GB to be refused)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    cfg = tmp_path / "config.json"
    spec = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 4, "vocab_size": 128, **edit}
    if "num_hidden_layer" in edit:
        del spec["num_hidden_layers"]
    spec = {k: v for k, v in spec.items() if v is not None}
    cfg.write_text(json.dumps(spec))
    r = runner.invoke(app, ["calibrate", "--model", str(cfg), "--grid", "test", "--out", str(tmp_path / "p.json")])
    _refused(r, f"{cfg}: ")
    assert why in r.output.replace("\n", " ") and not (tmp_path / "p.json").exists()


def test_calibrate_refuses_weights_larger_than_the_memory_available(tmp_path, monkeypatch):
    """Was: "not a config transformers can build a model from (can't allocate memory)" under a
    memory limit, or a machine swapping without one (Llama-2-7B: 27 GB in float32)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from ecoserve_sched import calibrate

    have = calibrate.memory_available()
    assert have is None or have > 0
    monkeypatch.setattr(calibrate, "memory_available", lambda: 2**20)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                               "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 4096}))
    r = runner.invoke(app, ["calibrate", "--model", str(cfg), "--grid", "test", "--out", str(tmp_path / "p.json")])
    _refused(r, f"{cfg}: its weights take ")
    assert "GiB of memory available" in r.output.replace("\n", " ") and not (tmp_path / "p.json").exists()


def test_calibrate_refuses_a_key_given_twice_an_empty_or_ambiguous_model(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    cfg = tmp_path / "config.json"
    cfg.write_text('{"model_type": "llama", "hidden_size": 64, "hidden_size": 32}')  # was: the last one won
    base = ["calibrate", "--grid", "test", "--out", str(tmp_path / "p.json"), "--model"]
    _refused(runner.invoke(app, [*base, str(cfg)]), "key 'hidden_size' is given twice")
    _refused(runner.invoke(app, [*base, ""]), "--model: empty")  # was: "error: : not a preset"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-llama").mkdir()  # was: the preset used, the folder's config.json not an input
    _refused(runner.invoke(app, [*base, "tiny-llama"]), "both a preset and a path here")
    assert not (tmp_path / "p.json").exists()


def test_calibrate_says_when_the_engine_cannot_run_the_model(tmp_path, monkeypatch):
    """Was: a bare assert (exit 1, "a bug"); transformers 5.24's continuous batching fails every
    OPT request."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("scipy")
    from ecoserve_sched.engines import transformers_cb

    real = transformers_cb.TransformersEngine.generate

    def failing(self, reqs, *args, **kwargs):
        run = real(self, reqs, *args, **kwargs)
        for r in run.results:
            r.tokens, r.error = r.tokens[:1], "AttributeError: no get_seq_length"
        return run

    monkeypatch.setattr(transformers_cb.TransformersEngine, "generate", failing)
    out = tmp_path / "p.json"
    r = runner.invoke(app, ["calibrate", "--model", "tiny-llama", "--grid", "test", "--repeats", "1", "--out", str(out)])
    _refused(r, "tiny-llama: the transformers engine ended 2 of 2 requests of a calibration run unfinished "
                "(AttributeError: no get_seq_length)")
    assert not out.exists()


def test_calibrate_names_a_profile_after_the_config_folder(tmp_path):
    from ecoserve_sched.calibrate import default_stem

    assert default_stem(str(tmp_path / "my-model" / "config.json")) == "my-model"  # was: "config"
    (tmp_path / "Qwen2.5-0.5B").mkdir()
    assert default_stem(str(tmp_path / "Qwen2.5-0.5B")) == "Qwen2.5-0.5B"  # was: "Qwen2.5-0"
    assert default_stem(str(tmp_path / "mistral.json")) == "mistral" and default_stem("tiny-llama") == "tiny-llama"


def test_a_default_max_tokens_below_a_rows_length_is_said(tmp_path):
    """A row without max_tokens takes --max-tokens, never below its true length: said (was:
    silent, so --max-tokens 100 ran a 500-token row whole without a word)."""
    t = tmp_path / "mt.csv"
    t.write_text("arrival_time_s,input_tokens,output_tokens,max_tokens\n0,10,500,\n1,10,500,600\n2,10,50,\n")
    r = runner.invoke(app, ["simulate", "--trace", str(t), "--policy", "orca", "--max-tokens", "100", "--json"])
    assert r.exit_code == 0, r.output
    assert ("1 rows without max_tokens have output_tokens above --max-tokens 100; their max_tokens is their "
            "output_tokens") in " ".join(r.stderr.split())
    r = runner.invoke(app, ["simulate", "--trace", str(t), "--policy", "orca", "--json"])
    assert r.exit_code == 0 and "rows without max_tokens" not in r.stderr


def test_an_option_given_twice_and_a_spaced_header_are_refused(tmp_path):
    """Were: the last value kept silently (`--policy vllm --policy sjf` ran sjf; `--out r1 --out
    r2` wrote r2); a header of `a, b` told to map ' b' with --columns, which strips names."""
    t = _trace(tmp_path)
    _refused(runner.invoke(app, ["simulate", "--trace", t, "--policy", "vllm", "--policy", "sjf"]),
             "--policy is given more than once; give it once")
    _refused(runner.invoke(app, ["compare", "--trace", t, "--out", str(tmp_path / "r1"), "--out", str(tmp_path / "r2")]),
             "--out is given more than once")
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
    spaced = tmp_path / "spc.csv"
    spaced.write_text("arrival_time_s, input_tokens, output_tokens\n0, 10, 10\n")
    _refused(runner.invoke(app, ["simulate", "--trace", str(spaced)]),
             "spc.csv:1: column ' input_tokens' is input_tokens with spaces around its name")
    spaced.write_text("arrival_time_s,input_tokens,output_tokens, max_tokens\n0,10,20,5\n")  # an optional one:
    _refused(runner.invoke(app, ["simulate", "--trace", str(spaced)]),  # was: ignored without a word
             "column ' max_tokens' is max_tokens with spaces around its name")
    r = runner.invoke(app, ["simulate", "--help", "--help"])  # eager options are not counted
    assert r.exit_code == 0 and "Usage" in r.output
    # burst8's rate is the one asked for, not its groups' (was: --rate 1e-6 refused as 1.25e-07)
    r = runner.invoke(app, ["simulate", "--trace", t, "--policy", "vllm", "--arrivals", "burst8", "--rate", "1e-6"])
    assert r.exit_code == 0, r.output


def test_demo_checks_its_output_before_working(tmp_path):
    import shutil

    from ecoserve_sched.demo import SAMPLE
    from rlpredict.serve.bundle import default_bundle_path

    _refused(runner.invoke(app, ["demo", "--out", str(SAMPLE.parent)]), "holds the input")
    # before annotating (were: a temporary folder made inside the bundle, then refused naming it
    # and `--output`; a rate scale too small for the trace's clock refused after annotating)
    bundle = tmp_path / "b"
    shutil.copytree(default_bundle_path(), bundle)
    files = sorted(p.name for p in bundle.iterdir())
    _refused(runner.invoke(app, ["demo", "--bundle", str(bundle), "--out", str(bundle / "sub")]),
             "--out lies inside the input")
    assert sorted(p.name for p in bundle.iterdir()) == files
    r = runner.invoke(app, ["demo", "--out", str(tmp_path / "d0"), "--rate-scales", "1e-300"])
    _refused(r, "at rate scale 1e-300 are past 2^36 s")
    assert "annotate" not in r.output and not (tmp_path / "d0").exists()
    out = tmp_path / "d"
    out.mkdir()
    (out / "old.md").write_text("x")
    _refused(runner.invoke(app, ["demo", "--out", str(out)]), "no tool of ours wrote")  # --force would not help
    _refused(runner.invoke(app, ["demo", "--out", str(out), "--rate-scales", "0.2,x"]), "'--rate-scales'")
    _refused(runner.invoke(app, ["demo", "--out", str(out), "--slo-tbt", "nan"]), "'--slo-tbt'")
    assert (out / "old.md").read_text() == "x"


@pytest.mark.parametrize("module", ["ecoserve_sched.cli", "rlpredict.cli"])
def test_each_command_is_summarized_in_one_line(module: str) -> None:
    """The commands panel of ``--help`` shows a docstring's first paragraph as it is written: a
    one-line summary, then a blank line before any detail."""
    import importlib

    import typer

    group = typer.main.get_command(importlib.import_module(module).app)
    for name, cmd in group.commands.items():
        summary = (cmd.help or "").strip().split("\n\n")[0]
        assert summary and "\n" not in summary, f"{module} {name}: {summary!r}"


def test_a_compare_header_names_the_predictions_its_policies_read(tmp_path):
    """vLLM's runs read no predictions: the header names those EcoServe's runs read (it named the
    first row's, vLLM's, which now says none)."""
    out = tmp_path / "o"
    r = runner.invoke(app, ["compare", "--trace", _trace(tmp_path, 5), "--policies", "vllm,sjf",
                            "--predictions", "oracle", "--rate-scales", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    head = (out / "table.md").read_text().splitlines()[0]
    assert "predictions: oracle" in head and "none" not in head


def test_a_public_trace_runs_with_its_own_columns_and_time_unit(tmp_path):
    t = tmp_path / "azure.csv"  # Azure's trace as published, one failed request logged with 0 tokens
    t.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.7527360,374,44\n"
                 "2023-11-16 18:15:47.0,879,0\n2023-11-16 18:15:50.7527360,396,109\n")
    columns = "arrival_time_s=TIMESTAMP,input_tokens=ContextTokens,output_tokens=GeneratedTokens"
    r = runner.invoke(app, ["simulate", "--trace", str(t), "--policy", "vllm", "--columns", columns,
                            "--time-unit", "iso", "--on-error", "skip", "--json"])
    assert r.exit_code == 0, r.output
    assert _strict(r.stdout)["requests"] == 2
    assert _strict(r.stdout)["skipped_rows"] == 1  # in the JSON too (was: on stderr only)
    assert f"read {t}: 2 requests over 4 s (0.25 requests/s); times taken from the first arrival" in r.stderr
    assert f"skipped 1 bad rows (first: {t}:3: GeneratedTokens (read as output_tokens)" in r.stderr
    r = runner.invoke(app, ["simulate", "--trace", str(t), "--columns", columns, "--time-unit", "iso"])
    assert r.exit_code == 2 and f"error: {t}:3: GeneratedTokens (read as output_tokens) must be" in r.output
    for bad, msg in [("arrival_time_s", "is not FIELD=COLUMN"), ("foo=TIMESTAMP", "'foo' is not a trace field"),
                     ("input_tokens=a,input_tokens=b", "input_tokens is mapped twice"), (" ", "is empty")]:
        r = runner.invoke(app, ["capacity", "--trace", str(t), "--columns", bad])
        assert r.exit_code == 2 and "--columns" in r.output and msg in " ".join(r.output.split()), (bad, r.output)
    r = runner.invoke(app, ["compare", "--trace", str(t), "--time-unit", "minutes"])
    assert r.exit_code == 2 and "unknown time unit 'minutes'" in r.output


def test_a_deadline_is_recorded_wherever_attainment_is(tmp_path):
    trace = _trace(tmp_path, 12)
    r = runner.invoke(app, ["simulate", "--trace", trace, "--policy", "vllm", *PROFILE, "--slo-deadline", "0.5", "--json"])
    assert r.exit_code == 0, r.output
    assert _strict(r.stdout)["slo_deadline_s"] == 0.5
    out = tmp_path / "cmp"
    r = runner.invoke(app, ["compare", "--trace", trace, "--policies", "vllm", "--rate-scales", "1.231,1.234",
                            *PROFILE, "--slo-deadline", "0.5", "--out", str(out)])
    assert r.exit_code == 0, r.output
    table = (out / "table.md").read_text()
    assert "SLO TTFT 5s / TBT 0.2s / deadline 0.5s" in table.splitlines()[0]
    assert "read " in table and "KV cache" in table  # what was read and the server settings
    assert "| 1.231 |" in table and "| 1.234 |" in table  # rate scales as given (was: both 1.23)
    r = runner.invoke(app, ["capacity", "--trace", trace, "--policy", "vllm", *PROFILE, "--slo-deadline", "0.5",
                            "--no-ceiling", "--json"])
    assert r.exit_code == 0, r.output
    assert _strict(r.stdout)["slo_deadline_s"] == 0.5


def test_settings_a_policy_cannot_take_are_refused_before_any_run(tmp_path):
    out = tmp_path / "mr"
    r = runner.invoke(app, ["compare", "--trace", _trace(tmp_path, 12), "--policies", "vllm,sarathi",
                            "--max-running", "600", "--rate-scales", "1,2", *PROFILE, "--out", str(out)])
    _refused(r, "--max-running", "sarathi: token budget 512 must exceed max_running 600", "--token-budget")
    assert "attainment" not in r.output and not out.exists()  # no run started (was: vllm ran first)
    r = runner.invoke(app, ["simulate", "--trace", _trace(tmp_path, 12), "--policy", "sarathi", "--predictions",
                            "confusion", "--max-running", "600", *PROFILE])  # (the predictions check builds it too)
    _refused(r, "--max-running", "sarathi: token budget 512 must exceed max_running 600")
    # the option the refusal is about (was: --max-running, whenever it was given)
    r = runner.invoke(app, ["simulate", "--trace", _trace(tmp_path, 12), "--policy", "vllm-v0", "--block-size", "1",
                            "--max-running", "4", *PROFILE])
    _refused(r, "Invalid value for '--block-size'", "use block_size >= 2")
    r = runner.invoke(app, ["compare", "--trace", _trace(tmp_path, 12), "--policies", "vllm",
                            "--rate-scales", "1,1e-300", *PROFILE, "--out", str(out)])
    _refused(r, "--rate-scales", "past 2^36 s")
    assert "attainment" not in r.output and not out.exists()


def test_a_drawn_rate_times_a_rate_scale_is_said(tmp_path):
    r = runner.invoke(app, ["simulate", "--trace", _trace(tmp_path, 12), "--policy", "vllm", *PROFILE,
                            "--arrivals", "poisson", "--rate", "1", "--rate-scale", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert "arrivals at 2 requests/s (--rate 1 x --rate-scale 2)" in r.stderr


def test_capacity_on_a_short_trace_says_why_it_passes_the_ceiling(tmp_path):
    r = runner.invoke(app, ["capacity", "--trace", _trace(tmp_path, 8), "--policy", "vllm", *PROFILE])
    assert r.exit_code == 0, r.output
    assert "no capacity found" in r.stdout and "saturation ceiling: rate scale" in r.stdout
    assert "above the ceiling: the criterion held up to x524288, " in r.stdout, r.stdout
    tiny = tmp_path / "tiny_gap.csv"  # a ratio of 1e304 in a few digits (was: all 305 of them)
    tiny.write_text("arrival_time_s,input_tokens,output_tokens\n0,10,10\n1e-300,10,10\n")
    r = runner.invoke(app, ["capacity", "--trace", str(tiny), "--policy", "vllm", *PROFILE])
    assert r.exit_code == 0 and "e+30" in r.stdout and ",000,000,000,000," not in r.stdout, r.stdout


def test_the_kv_timeline_drops_to_zero_while_the_server_idles(tmp_path):
    from ecoserve_sched.cost_model import load_profile
    from ecoserve_sched.request import SLO
    from ecoserve_sched.simulator import run
    from ecoserve_sched.trace import read_trace

    p = tmp_path / "gap.csv"
    p.write_text("arrival_time_s,input_tokens,output_tokens\n0,100,5\n30,100,5\n")
    res = run(read_trace(p), "vllm", load_profile("llama2-7b-a100-80gb"), slo=SLO())
    t, u = compare_mod.kv_timeline(res)
    assert t == sorted(t) and t[0] == 0.0  # from the first iteration's start
    idle = [i for i, v in enumerate(u) if v == 0.0]
    assert len(idle) == 1 and t[idle[0]] < 1 and t[idle[0] + 1] >= 30  # 0 from the first's end to the second's start
    assert t[-1] == pytest.approx(res.log[-1][0]) and u[-1] == u[-2] > 0  # the last step drawn to its end


def test_a_lone_requests_decodes_show_in_the_kv_timeline(tmp_path):
    """The last iteration's step is drawn to its end (was: ``steps-post`` gave it no width, so a
    lone request's plot stopped at its prefill's end, 0.18 of 2.15 s)."""
    from ecoserve_sched.cost_model import load_profile
    from ecoserve_sched.request import SLO
    from ecoserve_sched.simulator import run
    from ecoserve_sched.trace import read_trace

    p = tmp_path / "one.csv"
    p.write_text("arrival_time_s,input_tokens,output_tokens\n0,1000,100\n")
    res = run(read_trace(p), "vllm", load_profile("llama2-7b-a100-80gb"), slo=SLO())
    t, u = compare_mod.kv_timeline(res)
    assert t[0] == 0.0 and t[-1] == pytest.approx(res.requests[0].finish_s) and len(t) == len(u)
    assert t[-2] < 0.2 * t[-1] and u[-1] == u[-2] > u[0]  # the decodes' step spans the rest


def test_a_thinned_kv_timeline_keeps_each_share_of_the_spans_mean():
    from ecoserve_sched.serving import SimResult

    log = [((i + 1) * 0.1, 0.1, 1, 1, 50, 4) for i in range(10)]  # busy 0-1 s at half the cache
    log += [(100 + (i + 1) * 0.1, 0.1, 1, 1, 100, 7) for i in range(10)]  # idle to 100 s, then full
    t, u = compare_mod.kv_timeline(SimResult("p", "x", "none", [], 100, 16, log=log), points=4)
    assert t == pytest.approx([0, 25.25, 50.5, 75.75, 101])  # (the last: the span's end)
    assert u == pytest.approx([0.5 / 25.25, 0, 0, 1 / 25.25, 1 / 25.25])  # (was: every k-th step, idle held)


def test_capacity_refuses_up_front_what_the_ceiling_cannot_build(tmp_path):
    """The ceiling's flooded runs build vllm and ecoserve-oracle: a setting they refuse is named
    before the search (was: the whole search ran, then an error naming no option)."""
    args = ["capacity", "--trace", _trace(tmp_path), "--policy", "vllm-v0", "--max-running", "4000"]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "'--max-running': vllm (the saturation ceiling's; --no-ceiling skips it): token " \
        "budget 2048 must exceed max_running 4000" in r.output.replace("\n", " ")
    r = runner.invoke(app, [*args, "--no-ceiling", "--json"])
    assert r.exit_code == 0, r.output


def test_calibrate_refuses_an_empty_out(tmp_path):
    """Was: ".: --out holds the input cfg.json", as if the current folder had been named."""
    _refused(runner.invoke(app, ["calibrate", "--model", str(tmp_path / "cfg.json"), "--out", ""]),
             "Invalid value for '--out'", "empty: give a profile JSON file")
