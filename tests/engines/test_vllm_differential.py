"""The differential check (``engines/differential.py``): the simulator and vLLM's own scheduler
agree on the cases the fuzzer kept (``fixtures/sim_vs_vllm_cases.jsonl``, each a difference it
once found) and on fresh random ones; a case's JSON, its errors, and the shrinker."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from ecoserve_sched.engines.differential import Case, differences, random_case, replay, shrink

ROOT = Path(__file__).resolve().parents[2]
KEPT = [json.loads(line) for line in (Path(__file__).parent / "fixtures" / "sim_vs_vllm_cases.jsonl").read_text().splitlines()]


def _kept(most_s: float) -> list:
    """The kept cases that replay within ``most_s`` seconds on a 2-core machine (the others:
    ``benchmarks/sim_vs_vllm_fuzz.py --replay``), those over a second marked slow."""
    return [pytest.param(k, id=str(k["seed"]), marks=[pytest.mark.slow] if k["seconds"] > 1 else [])
            for k in KEPT if k["seconds"] <= most_s]


@pytest.mark.parametrize("kept", _kept(10.0))
def test_the_simulator_and_vllm_agree_on_every_case_the_fuzzer_kept(kept: dict) -> None:
    assert differences(Case.from_json(kept["case"])) == [], kept["found"]


#: Request 1 decodes with no free block left and is the largest victim key, behind a prompt's
#: chunk that takes the whole 3-token budget (the reviewer's fuzzer, reduced from 44 requests).
UNREACHED = Case((10.0, 11.5, 11.5, 12.0, 12.0, 12.063, 12.063, 12.063), (153, 2, 3, 15, 147, 128, 3, 81),
                 (1, 254, 1, 1, 2, 1, 1, 1), (2048, 256, 1, 2048, 256, 1, 2048, 1),
                 ((6, 48, 48), (-1, 0, 0), (0, 6, 6), (0, 1, 1), (0, 0, 0), (-1, 0, 0), (-1, 0, 0), (1, 10, 10)),
                 slo_ttft_s=0.05, kv_blocks=20, token_budget=3, max_running=2)


def test_a_victim_the_budget_does_not_reach_is_preempted_as_in_the_simulator() -> None:
    """vLLM's loop never reached request 1 (``UNREACHED``): it was left unscheduled, holding its
    blocks, where the simulator preempted it (its finish 20.29 s in vLLM against 22.68 s). The
    plug-in preempts such victims before vLLM's loop now."""
    assert differences(UNREACHED) == []


def test_no_victim_is_preempted_before_vllms_loop_while_vllm_is_paused(monkeypatch) -> None:
    """Paused (``pause_generation``), vLLM's loop runs no request and preempts none: nor does
    the plug-in, in the step where it would preempt ``UNREACHED``'s victim before the loop."""
    from vllm.v1.core.sched.interface import PauseState

    from ecoserve_sched.engines.vllm_scheduler import EcoServeMixin

    before, schedule, paused = EcoServeMixin._before_step, EcoServeMixin.schedule, []

    def pause_when_preempting(self) -> None:
        before(self)
        if self._gone and not paused:
            self._pause_state = PauseState.PAUSED_ALL

    def step(self, *args, **kwargs):
        out = schedule(self, *args, **kwargs)
        if self._pause_state == PauseState.PAUSED_ALL:
            paused.append(out)
            self._pause_state = PauseState.UNPAUSED
        return out

    monkeypatch.setattr(EcoServeMixin, "_before_step", pause_when_preempting)
    monkeypatch.setattr(EcoServeMixin, "schedule", step)
    replay(UNREACHED)
    assert len(paused) == 1 and not paused[0].preempted_req_ids and not paused[0].num_scheduled_tokens


@pytest.mark.parametrize("seed", range(12))
def test_fresh_random_cases_agree(seed: int) -> None:
    """A few fresh cases of at most 40 requests, both pairs, KV blocks of 8 to 64 tokens (the
    fuzzer runs thousands)."""
    case = random_case(random.Random(10_000_000 + seed), max_requests=40, block_sizes=(8, 16, 32, 64))
    assert differences(case) == []


def test_a_case_round_trips_through_json_and_a_bad_one_names_its_field() -> None:
    case = random_case(random.Random(3), pair="ecoserve")
    assert Case.from_json(json.loads(json.dumps(case.to_json()))) == case
    good = case.to_json()
    for change, field in (({"prompt_tokens": good["prompt_tokens"][:-1] or [1, 1]}, "prompt_tokens"),
                          ({"kv_blocks": 0}, "kv_blocks"), ({"pair": "sarathi"}, "pair"),
                          ({"settings": {"swap": True}}, "settings"), ({"colour": 1}, "colour"),
                          ({"arrivals_s": [1.0, 0.5, *good["arrivals_s"][2:]]}, "arrivals_s"),
                          ({"arrivals_s": [], "prompt_tokens": [], "output_tokens": [], "max_tokens": [],
                            "predictions": None}, "arrivals_s"),
                          ({"profile": "nope"}, "profile"), ({"profile": 5}, "profile"), ({"pair": ["x"]}, "pair"),
                          ({"slo_ttft_s": True}, "slo_ttft_s"), ({"slo_tbt_s": 1e-300}, "slo_tbt_s"),
                          ({"settings": {"reserve_frac": 7.0}}, "settings"),
                          ({"predictions": [[5, -2, -3]] * len(good["arrivals_s"])}, "predictions"),
                          ({"predictions": [[True, 2, 3]] * len(good["arrivals_s"])}, "predictions"),
                          # were: 3.2 GB and then a "disagreement"; an internal error (OverflowError)
                          ({"kv_blocks": 10 ** 8}, "kv_blocks"), ({"block_size": 10 ** 8}, "block_size"),
                          ({"slo_ttft_s": 10 ** 400}, "slo_ttft_s"),
                          ({"arrivals_s": [10 ** 400] * len(good["arrivals_s"])}, "arrivals_s"),
                          ({"settings": {"aging": 10 ** 400}}, "settings"),
                          ({"predictions": [[5, 10 ** 30, 10 ** 30]] * len(good["arrivals_s"])}, "predictions"),
                          ({"prompt_tokens": [10 ** 20] * len(good["arrivals_s"])}, "prompt_tokens")):
        with pytest.raises(ValueError, match=f"field '{field}'"):
            Case.from_json({**good, **change})


def test_shrink_keeps_what_differs_and_drops_the_rest() -> None:
    """With a stand-in for the replay (a case "differs" while it holds a prompt over 100
    tokens), the shrinker leaves one request, one KV block and plain settings."""
    n = 10
    case = Case(tuple(0.5 * i for i in range(n)), tuple(150 if i == 3 else 20 + i for i in range(n)),
                (40,) * n, (2048,) * n, tuple((0, 30, 40) for _ in range(n)), "ecoserve", {"park": False},
                slo_ttft_s=2.0, kv_blocks=64, token_budget=512, max_running=4)
    small = shrink(case, lambda c: max(c.prompt_tokens) > 100)
    assert len(small) == 1 and small.prompt_tokens[0] > 100 and small.kv_blocks == 1
    assert small.settings == {} and small.token_budget == 2048 and small.max_running == 256


def test_the_fuzzer_script_reports_its_cases_and_replays_its_own_file(tmp_path: Path) -> None:
    out = tmp_path / "found.jsonl"
    run = [sys.executable, str(ROOT / "benchmarks" / "sim_vs_vllm_fuzz.py")]
    p = subprocess.run([*run, "--cases", "4", "--seed", "7", "--max-requests", "20", "--workers", "1",
                        "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "| pair | cases | agree |" in p.stdout and out.read_text() == ""
    kept = tmp_path / "kept.jsonl"
    kept.write_text(json.dumps(KEPT[0]) + "\n\nnot json\n")
    p = subprocess.run([*run, "--replay", str(kept)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == f"error: {kept}:3: not JSON (Expecting value)"
    p = subprocess.run([*run, "--replay", str(out), "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert p.returncode == 2 and "--out" in p.stderr
    # a case over the time limit is reported as such, not as a difference (the kept case of 44 s)
    slow = tmp_path / "slow.jsonl"
    slow.write_text(json.dumps(max(KEPT, key=lambda k: k["seconds"])) + "\n")
    p = subprocess.run([*run, "--replay", str(slow), "--timeout", "1"], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert p.returncode == 1 and "| 1 | 0 | 0 | 1 |" in p.stdout and "over the 1 s limit" in p.stdout


def test_the_fuzzer_script_checks_the_engine_replays_against_engine_core(tmp_path: Path) -> None:
    """``--against engine-core``: each case in both engine loops, one table row per engine
    policy; the kept cases replay the same way; ``--shrink`` is the simulator check's only."""
    run = [sys.executable, str(ROOT / "benchmarks" / "sim_vs_vllm_fuzz.py"), "--against", "engine-core"]
    p = subprocess.run([*run, "--cases", "6", "--seed", "3", "--max-requests", "12", "--block-sizes", "8,16",
                        "--workers", "1"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "## The engine replays against vLLM's own EngineCore: 6 random cases" in p.stdout
    assert "| engine policy | cases | agree |" in p.stdout
    rows = [line for line in p.stdout.splitlines() if line.startswith(("| vllm-real", "| async-", "| ecoserve-"))]
    assert rows and all(line.split("|")[2] == line.split("|")[3] for line in rows)  # every case agrees
    assert "ECOSERVE_PREDICTOR" not in p.stderr  # the plug-in's warning for a served engine
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps(min(KEPT, key=lambda k: k["seconds"])) + "\n")
    p = subprocess.run([*run, "--replay", str(small)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    p = subprocess.run([*run, "--shrink", f"{small}:1", "--out", str(tmp_path / "x.json")], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 2 and "--shrink reduces a case of the simulator's check" in p.stderr
