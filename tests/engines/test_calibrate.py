"""`ecoserve calibrate --engine transformers` on CPU: a tiny random Llama, the test grid."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("scipy")

from typer.testing import CliRunner

from ecoserve_sched.cli import app
from ecoserve_sched.cost_model import load_profile


def test_calibrate_cli_writes_a_loadable_profile(tmp_path, tiny_llama):
    out = tmp_path / "tiny.json"
    r = CliRunner().invoke(app, ["calibrate", "--engine", "transformers", "--model", "tiny-llama",
                                 "--device", "cpu", "--grid", "test", "--repeats", "1",
                                 "--token-budget", "64", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    fit = json.loads(r.stdout.strip().splitlines()[-1])["fit"]
    assert fit["n_samples"] >= 10 and fit["mean_rel_error"] < 1.0
    prof = load_profile(out)
    assert prof.spec["calibration"]["engine"].startswith("transformers")
    cal = prof.spec["calibration"]
    assert cal["token_budget"] == 64 and max(row[0] for row in cal["samples"]) == 64  # chunked
    # the engine's budget is a setting of the run, not the profile's knee (EcoServe's floor)
    assert "token_budget" not in prof.spec and prof.token_budget == prof.knee_tokens()
    assert prof.spec["model"]["n_layers"] == 2 and prof.spec["model"]["hidden"] == 64
    assert 0 < prof.iteration_time(0, 0, 4, 400) < prof.iteration_time(512, 512 * 256, 4, 400)


def test_calibrate_cli_rejects_unknown_engine_and_model(tmp_path):
    r = CliRunner().invoke(app, ["calibrate", "--engine", "vllm", "--model", "tiny-llama",
                                 "--out", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "unknown engine" in r.output
    r = CliRunner().invoke(app, ["calibrate", "--model", str(tmp_path / "nope"),
                                 "--out", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "not a preset" in r.output


def test_the_device_peak_is_measured_in_the_models_dtype():
    torch = pytest.importorskip("torch")
    from ecoserve_sched.calibrate import device_section

    assert "torch.bfloat16 matmul" in device_section("cpu", torch.bfloat16)["source"]["peak_flops"]  # was fp32
    assert "torch.float32 matmul" in device_section("cpu")["source"]["peak_flops"]


def test_the_report_warns_of_a_rough_fit_and_prints_a_bound_as_zero():
    """Was: a 70.8% held-out error written without a word, and "overhead 7.78e-16 ms"."""
    from types import SimpleNamespace

    from ecoserve_sched.calibrate import ROUGH_FIT, Calibration

    eff = {"mfu": 0.4, "mbu": 0.6, "overhead_s": 7.78e-19, "overhead_per_seq_s": 2e-5, "prefill_overhead_s": 1e-3}
    prof = SimpleNamespace(name="p", fit_error={"n_samples": 12, "mean_rel_error": 0.5, "max_rel_error": 0.9},
                           spec={"efficiency": eff})
    for err, warned in ((0.708, True), (ROUGH_FIT / 2, False)):
        text = Calibration(prof, [], {"mean_rel_error": err, "max_rel_error": 1.0}, None, 1.0).report()
        assert ("warning: the fit misses held-out iterations by 71% on average" in text) is warned
        assert "overhead 0 ms, per decoding request 0.02 ms, prefill 1 ms" in text


def test_a_token_budget_below_the_grids_requests_is_refused_up_front(tmp_path):
    """Was: raised to the run's slots without a word, measured for 8 s, then refused naming a
    budget the user had not given; a grid row with a q-token prompt runs b + 1 requests."""
    r = CliRunner().invoke(app, ["calibrate", "--engine", "transformers", "--model", "tiny-llama", "--device", "cpu",
                                 "--grid", "small", "--token-budget", "18", "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 2 and not (tmp_path / "p.json").exists()
    assert "--token-budget 18: grid 'small' runs up to 17 requests at once, so the engine needs a budget of at " \
           "least 19 tokens" in r.output.replace("\n", " ")
