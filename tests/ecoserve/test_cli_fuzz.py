"""Fuzz the ecoserve CLI's options with random values (NaN, inf, negatives, huge numbers,
garbage strings): every run ends with exit 0 or 2, never a traceback or an internal error, and
what ``--json`` prints is strict JSON."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ecoserve_sched.cli import app
from tests.garbled_rows import FUZZ

runner = CliRunner()

#: What a user might type for a number: about half of it plausible, so that runs get past
#: the option checks too.
BAD = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),  # nan, inf, -0.0, 1e+300, 5e-324
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.sampled_from(["", "abc", "1e999", "-inf", "NaN", "0x10", "1_000", "--", "1,2", " 3",
                     "1e-320", "9" * 400]),
    st.text(max_size=8),
)
PLAUSIBLE = st.one_of(
    st.floats(min_value=1e-3, max_value=1.0).map(repr),
    st.floats(min_value=1.0, max_value=1e3).map(repr),
    st.integers(min_value=0, max_value=64).map(str),
    st.sampled_from(["1", "2", "0.5", "0.2", "1e3", "4096"]),
)
VALUES = st.one_of(BAD, PLAUSIBLE)
SCALE_LISTS = st.lists(st.one_of(BAD, PLAUSIBLE, PLAUSIBLE), min_size=1, max_size=2).map(",".join)

SIMULATE = ("--rate-scale", "--slo-ttft", "--slo-tbt", "--slo-deadline", "--max-tokens",
            "--max-requests", "--seed", "--rate", "--cv")
CAPACITY = ("--target", "--slo-ttft", "--slo-tbt", "--slo-deadline", "--max-tokens",
            "--max-requests", "--seed")
CALIBRATE = ("--repeats", "--token-budget", "--threads")


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> str:
    p = tmp_path_factory.mktemp("fuzz") / "t.csv"
    p.write_text("arrival_time_s,input_tokens,output_tokens\n"
                 + "".join(f"{i * 0.5},{100 + 37 * i},{10 + 29 * i}\n" for i in range(5)))
    return str(p)


def _args(options: dict[str, str]) -> list[str]:
    return [a for k, v in options.items() for a in (k, v)]


def _check(r, as_json: bool = False) -> None:
    assert r.exit_code in (0, 2), r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output and "internal error" not in r.output, r.output
    if r.exit_code == 0 and as_json:
        def refuse(c: str) -> None:
            raise AssertionError(f"bare {c} in JSON output")
        json.loads(r.stdout, parse_constant=refuse)


@settings(FUZZ, max_examples=50)
@given(options=st.dictionaries(st.sampled_from(SIMULATE), VALUES, min_size=1, max_size=2),
       arrivals=st.sampled_from(["poisson", "gamma"]))
def test_simulate_options(trace, options, arrivals):
    extra = []
    if "--rate" in options or "--cv" in options:  # what they need (mismatches: test_cli.py)
        extra = ["--arrivals", "gamma" if "--cv" in options else arrivals]
        extra += [] if "--rate" in options else ["--rate", "2"]
    r = runner.invoke(app, ["simulate", "--trace", trace, "--predictions", "oracle", "--json",
                            *extra, *_args(options)])
    _check(r, as_json=True)


@settings(FUZZ, max_examples=50)
@given(options=st.dictionaries(st.sampled_from(CAPACITY), VALUES, min_size=1, max_size=2))
def test_capacity_options(trace, options):
    r = runner.invoke(app, ["capacity", "--trace", trace, "--predictions", "oracle", "--json",
                            "--policy", "vllm", *_args(options)])
    _check(r, as_json=True)
    if r.exit_code == 0:
        c = json.loads(r.stdout)
        assert (c["max_rate_scale"] is None) == (c["search"] != "found")


@settings(FUZZ, max_examples=30)
@given(scales=SCALE_LISTS, policies=st.sampled_from(["vllm", "vllm,sjf", "sjf", "", ",", "vllm,vllm", "x"]))
def test_compare_lists(trace, scales, policies):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "o"
        r = runner.invoke(app, ["compare", "--trace", trace, "--predictions", "oracle", "--out",
                                str(out), "--policies", policies, "--rate-scales", scales])
        _check(r)
        assert out.exists() == (r.exit_code == 0)
        assert [p.name for p in Path(tmp).iterdir()] == (["o"] if r.exit_code == 0 else [])
        if r.exit_code == 0:
            rows = json.loads((out / "results.json").read_text(),
                              parse_constant=lambda c: pytest.fail(f"bare {c}"))
            assert {row["rate_scale"] for row in rows} == {float(x) for x in scales.split(",")}


@settings(FUZZ, max_examples=50)
@given(options=st.dictionaries(st.sampled_from(CALIBRATE), VALUES, min_size=1, max_size=3))
def test_calibrate_options(tmp_path_factory, options):
    out = tmp_path_factory.mktemp("cal") / "p.json"
    out.write_text("{}")  # every run that passes the checks stops here: no --force
    r = runner.invoke(app, ["calibrate", "--model", "tiny-llama", "--out", str(out), *_args(options)])
    _check(r)
    assert r.exit_code == 2 and out.read_text() == "{}"


@settings(FUZZ, max_examples=50)
@given(ttft=VALUES, tbt=VALUES, scales=SCALE_LISTS)
def test_demo_options(tmp_path_factory, ttft, tbt, scales):
    out = tmp_path_factory.mktemp("demo")
    (out / "old.md").write_text("x")  # every run that passes the checks stops here: no --force
    r = runner.invoke(app, ["demo", "--out", str(out), "--slo-ttft", ttft, "--slo-tbt", tbt,
                            "--rate-scales", scales])
    _check(r)
    assert r.exit_code == 2 and (out / "old.md").read_text() == "x"
