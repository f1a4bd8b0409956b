"""The scenario grid's cells (``benchmarks/scenario_grid.py``): the random draws of
``--cells random:N`` and the ``--cells`` errors. Nothing here replays a trace."""

from __future__ import annotations

import importlib.util
import inspect
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ecoserve_sched.compare import Server, capacity
from ecoserve_sched.cost_model import list_profiles, load_profile

GRID = Path(__file__).resolve().parents[2] / "benchmarks" / "scenario_grid.py"


@pytest.fixture(scope="module")
def grid():
    spec = importlib.util.spec_from_file_location("scenario_grid", GRID)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["scenario_grid"] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("scenario_grid", None)


def test_random_cells_are_a_fixed_draw_per_seed(grid) -> None:
    a, b, c = grid.random_cells(12, 0), grid.random_cells(12, 0), grid.random_cells(12, 1)
    assert a == b
    assert a != c
    names = [x.name for x in a + c]
    assert len(set(names)) == len(names)  # seeds and indices keep names apart
    assert not {x.name for x in a} & {x.name for x in grid.ALL_CELLS}


def test_find_cell_takes_named_cells_and_random_draws_by_prefix(grid) -> None:
    named = grid.ALL_CELLS[0]
    assert grid.find_cell(named.name) is named
    drawn = grid.random_cells(11, 2)[10]
    assert grid.find_cell("r2.10") == drawn == grid.find_cell(drawn.name)  # the prefix or the full name
    for bad in ("nope", "r2.10-not-its-name", "r2", "rx.1", "r2.-1", ""):
        assert grid.find_cell(bad) is None


def test_vllm_at_a_budget_is_vllm_with_that_token_budget(grid) -> None:
    assert grid.budget_policy("vllm@1024") is None and grid.budget_policy("sjf") is None
    assert "vllm@B" in grid.budget_policy("vllm@0") and "vllm@B" in grid.budget_policy("vllm@1k")
    assert "vllm@B" in grid.budget_policy("vllm@256")  # not above max_num_seqs: no room for a prompt
    assert grid.DEFAULT_TOKEN_BUDGET in grid.TUNED_BUDGETS  # the default is one of the tuned runs
    # vllm@B/S: max_num_seqs S too (`vllm serve`'s H100/H200 defaults are 8192/1024)
    assert grid.budget_policy("vllm@8192/1024") is None and grid.budget_policy("vllm@300/16") is None
    assert "B > 1024" in grid.budget_policy("vllm@1024/1024")  # B must exceed S, not the default 256
    for bad in ("vllm@8192/", "vllm@8192/0", "vllm@8192/x", "vllm@8192/1/2", "vllm@/16",
                "vllm@8192/\u00b2", "vllm@\u0664\u0660\u0669\u0666/100", "vllm@4096/\u0661\u0660\u0660"):  # ASCII digits only
        assert "vllm@B" in grid.budget_policy(bad), bad


def test_vllm_at_a_budget_and_seqs_runs_vllm_with_both(grid, tmp_path, monkeypatch) -> None:
    @dataclass(frozen=True)
    class Spec:  # resolve() changes only the server of the cell's spec: no trace is read here
        server: Server

    monkeypatch.setattr(grid, "spec_of", lambda cell, shared, n, policy="vllm": Spec(cell.server))
    cell = grid.find_cell("azure")
    spec, run_as = grid.resolve(cell, "vllm@8192/1024", tmp_path, 10)
    assert run_as == "vllm" and (spec.server.token_budget, spec.server.max_running) == (8192, 1024)
    spec, _ = grid.resolve(cell, "vllm@4096", tmp_path, 10)
    assert (spec.server.token_budget, spec.server.max_running) == (4096, None)


def test_policy_names_the_grid_and_its_helpers_run(grid) -> None:
    for name in ("ecoserve", "vllm-v0", "vllm@1024", "vllm-tuned", "vllm-real"):
        assert grid.unknown_policy(name) is None, name
    assert "vllm-tuned" in grid.unknown_policy("nosuch")
    assert grid.unknown_policy("vllm@1024", tuned=False) is None  # attainment_curve, slo_anatomy: resolve()
    assert "unknown policy 'vllm-tuned'" in grid.unknown_policy("vllm-tuned", tuned=False)
    assert "vllm@B" in grid.unknown_policy("vllm@0")


def test_random_cells_are_servable_scenarios(grid) -> None:
    profiles = set(list_profiles())
    for cell in grid.random_cells(40, 3):
        assert cell.profile in profiles
        assert any(cell.profile.startswith(m + "-") for m in grid.RANDOM_MODELS[cell.trace]), cell
        util = cell.server.gpu_memory_utilization
        assert load_profile(cell.profile).kv_blocks(16, util) >= 1024  # the longest prompts fit
        assert cell.slo.ttft_s in grid.RANDOM_TTFT_S and cell.slo.tbt_s in grid.RANDOM_TBT_S
        assert cell.arrivals in ("trace", "poisson", "gamma", "burst8")
        if cell.trace in ("sharegpt", "alpaca"):
            assert cell.arrivals != "trace"  # chat turns have no arrival times: Poisson
        if cell.trace == "mooncake":
            assert cell.profile.startswith("llama3-8b")  # an 8k window for its long prompts


@pytest.mark.parametrize("option, value, message", [
    ("--cells", "random:0", "random:N"), ("--cells", "random:x", "random:N"), ("--cells", "nope", "unknown cell"),
    ("--policies", "vllm,vllm@x", "vllm@B"), ("--policies", "sjf,ecoserve", "must include vllm"),
    ("--max-p99-tbt", "0", "--max-p99-tbt"), ("--max-p99-tbt", "nan", "--max-p99-tbt"),
    ("--max-p99-tbt", "fast", "--max-p99-tbt"), ("--resolution", "0", "--resolution"),
    ("--resolution", "inf", "--resolution"),
    ("--policies", "vllm,ecoserve,vllm", "'vllm' is given twice"),  # was: run twice, refused later by grid_summary
    ("--kv-scale", "0_5", "expected a number, got '0_5'"), ("--skip", "\u0663", "--skip"),  # were 5.0 and 3
    ("--max-p99-tbt", "1_0", "--max-p99-tbt"), ("--kv-scale", "-1", "--kv-scale"),
])
def test_bad_cells_and_policies_are_one_line_and_exit_2(option: str, value: str, message: str,
                                                         tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, str(GRID), "--shared", str(tmp_path), option, value],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert message in p.stderr
    assert "Traceback" not in p.stderr


def test_resolution_keeps_the_default_search_and_gives_finer_ones_their_runs(grid) -> None:
    defaults = {k: v.default for k, v in inspect.signature(capacity).parameters.items()}
    assert grid._search(grid.RESOLUTION) == {"rel_tol": defaults["rel_tol"], "max_runs": defaults["max_runs"]}
    assert grid._search(0.005) == {"rel_tol": 0.005, "max_runs": defaults["max_runs"] + 2}  # two more halvings
    assert grid._search(0.003)["max_runs"] == defaults["max_runs"] + 3
    assert grid._search(0.1)["max_runs"] == defaults["max_runs"]  # coarser: no fewer runs than the default


def test_code_trace_has_the_published_shape_and_slices(grid) -> None:
    tr = grid.code_trace(6000)
    c = grid.CODE_SHAPE
    assert len(tr) == 6000 and tr.arrival_s[0] == 0 and (tr.arrival_s[1:] >= tr.arrival_s[:-1]).all()
    # medians within 5% of the published ones; caps hold
    assert abs(float(np.median(tr.input_tokens)) / c["prompt_median"] - 1) < 0.05
    assert abs(float(np.median(tr.output_tokens)) / c["output_median"] - 1) < 0.1
    assert tr.input_tokens.min() >= 1 and tr.input_tokens.max() <= c["max_prompt"]
    assert tr.output_tokens.min() >= 1 and tr.output_tokens.max() <= c["max_output"]
    for n, skip in [(1000, 5000), (1000, 3000), (9000, 2000)]:  # --skip: request i is request i
        part = grid.code_trace(n, skip=skip)
        k = min(n, 6000 - skip)
        assert (part.input_tokens[:k] == tr.input_tokens[skip:skip + k]).all()
        assert (part.output_tokens[:k] == tr.output_tokens[skip:skip + k]).all()
    # prompt and output lengths are independent draws, within a slice and across slices
    later = grid.code_trace(6000, skip=6000)
    logs = np.log(np.stack([tr.input_tokens, tr.output_tokens, later.input_tokens, later.output_tokens]))
    assert np.abs(np.corrcoef(logs)[np.triu_indices(4, 1)]).max() < 0.05


def test_synthetic_cells_load_without_shared_data(grid, tmp_path: Path) -> None:
    for cell in grid.SYNTHETIC_CELLS:
        assert cell.trace == "code" and cell.profile in set(list_profiles())
        tr = grid.load_trace(cell, tmp_path, 200)  # no data folder needed
        assert len(tr) == 200
        if cell.arrivals == "burst8":
            assert tr.arrival_s[0] == tr.arrival_s[7] < tr.arrival_s[8]


def test_slo_anatomy_reference_is_shortest_feasible_first(tmp_path: Path) -> None:
    path = GRID.parent / "slo_anatomy.py"
    spec = importlib.util.spec_from_file_location("slo_anatomy", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # three at once, TTFT 3.5 s: 1 s and 2 s prompts make it, the 3 s one (then due at 6 s) not
    assert mod.reference_ttft(np.array([0.0, 0.0, 0.0]), np.array([3.0, 1.0, 2.0]), 3.5) == pytest.approx(2 / 3)
    # the hopeless one is served when nothing else waits, and does not block a later arrival
    assert mod.reference_ttft(np.array([0.0, 0.0, 4.0]), np.array([3.0, 3.0, 1.0]), 3.5) == pytest.approx(2 / 3)
    p = subprocess.run([sys.executable, str(path), "--shared", str(tmp_path), "--cell", "nope"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown cell" in p.stderr and "Traceback" not in p.stderr


def test_slo_anatomy_says_which_share_of_the_requests_its_means_count(tmp_path: Path) -> None:
    """The means are over finished requests: vLLM V0 ignores the synthetic code prompts over its
    token limit, and the ``finished`` column says so beside its shorter mean JCT."""
    p = subprocess.run([sys.executable, str(GRID.parent / "slo_anatomy.py"), "--shared", str(tmp_path), "--cell",
                        "code-synth", "--loads", "0.5", "--policies", "vllm,vllm-v0", "--requests", "100",
                        "--workers", "1"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("|")]
    assert "| SLO attainment | finished | TTFT missed |" in lines[0]
    assert {ln.count("|") for ln in lines} == {16}  # 15 columns in every row, the reference's too
    rows = {ln.split("|")[2].strip(): ln.split("|") for ln in lines[2:]}
    assert float(rows["vllm"][4]) == 1.0 and float(rows["vllm-v0"][4]) < 1.0


@pytest.mark.parametrize("cells, message", [
    ("r2.10,r2.10", "given twice"),  # a random cell by its rS.I name (was: "unknown cell")
    ("random:11,r2.10", "given twice"),  # the same cell as random:11's last with --cell-seed 2
    ("r2.10-not-its-name", "unknown cell"),
])
def test_cells_take_a_random_cell_by_its_name(cells: str, message: str, tmp_path: Path) -> None:
    seed = ["--cell-seed", "2"] if "random:" in cells else []  # (an rS.I names its own: refused beside one)
    p = subprocess.run([sys.executable, str(GRID), "--shared", str(tmp_path), "--cells", cells, *seed],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert message in p.stderr and "r2.10" in p.stderr
    assert "Traceback" not in p.stderr


def test_a_slice_that_arrives_at_once_and_bad_data_rows_are_said(grid, tmp_path: Path, capsys) -> None:
    """A slice whose arrivals are all equal has no rate to keep: one line (was: ZeroDivisionError,
    Mooncake's first ten requests); bad ShareGPT rows are skipped and counted on stderr (was:
    dropped without a word)."""
    import gzip
    import json

    moon = tmp_path / "mooncake_conversation_trace"
    moon.mkdir()
    rows = [{"arrival_time_s": 0.0, "input_tokens": 10, "output_tokens": 5}] * 3
    (moon / "mooncake_conversation_trace.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps(r) + "\n" for r in rows).encode()))
    with pytest.raises(SystemExit, match=r"first 2 requests all arrive at once.*more --requests"):
        grid.load_trace(grid.find_cell("mooncake"), tmp_path, 2)
    share = tmp_path / "sharegpt_v3"
    share.mkdir()
    lines = [json.dumps({"id": f"c{i}:1", "conversation_id": f"c{i}", "turn": 1, "prompt": "hi there",
                         "response": "hello, how can I help"}) for i in range(4)] + ['{"prompt": 5}']
    (share / "sharegpt_v3.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    tr = grid.sharegpt_trace(tmp_path, 10)
    assert len(tr) == 4 and "skipped 1 rows" in capsys.readouterr().err


def test_vllm_tuned_ranks_a_budget_no_load_failed_first(grid) -> None:
    """Was: a budget whose search found no failing load ranked last (its capacity is None), so a
    budget that failed at some load was reported as the best (a reviewer's find, cell r0.2)."""
    never = {"max_rate_scale": None, "search": "no_failing_load"}
    found, none = {"max_rate_scale": 2.5, "search": "found"}, {"max_rate_scale": None, "search": "none_passed"}
    assert max([found, never, none], key=grid._rank) is never
    assert max([none, found], key=grid._rank) is found


def test_code_trace_skips_in_bounded_memory_to_the_same_requests(grid, monkeypatch) -> None:
    """Was: ``skip + n`` draws held at once (352 MB at --skip 20,000,000); now a chunk at a time,
    and request i is still the i-th pair of draws."""
    monkeypatch.setattr(grid, "CODE_SKIP_CHUNK", 7)
    whole, part = grid.code_trace(40), grid.code_trace(10, skip=30)
    assert (part.input_tokens == whole.input_tokens[30:]).all() and (part.output_tokens == whole.output_tokens[30:]).all()


def test_cell_seed_without_random_cells_is_refused() -> None:
    """Was: taken, and the named cells run as they are."""
    import subprocess

    res = subprocess.run([sys.executable, str(GRID), "--shared", "nowhere", "--cells", "azure", "--cell-seed", "3",
                          "--policies", "vllm"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--cell-seed: seeds the cells 'random:N' draws" in res.stderr, res.stderr


def test_the_grid_tables_show_small_capacities_and_ceilings(grid) -> None:
    """Were three decimals: 0.011 for 0.01053 beside ratios of the exact figure, 0.000 for a
    ceiling of 7.3e-05 (reviewers' finds)."""
    row = {"cell": "c", "ceiling": 7.3e-05, "policy": "vllm", "capacity": 0.01053, "search": "found",
           "vs_ceiling": None, "x_v1": 1.0, "x_v0": None, "jct_x_v1": None, "norm_latency_x_v1": None,
           "attainment_at_v1_load": None}
    text = grid.markdown([row], 10, 1.0)
    assert "| c | 7.3e-05 | vllm | 0.0105 |" in text, text


def test_serve_defaults_follow_vllms_rule_per_gpu(grid) -> None:
    from ecoserve_sched.policies.interface import serve_defaults

    gib = 2**30
    assert serve_defaults("NVIDIA H100 80GB HBM3", 79.6 * gib) == (8192, 1024)
    assert serve_defaults("NVIDIA H200", 139.8 * gib) == (8192, 1024)
    assert serve_defaults("NVIDIA A100-SXM4-80GB", 79.2 * gib) == (2048, 256)  # vLLM's A100 exception
    assert serve_defaults("NVIDIA L4", 22 * gib) == (2048, 256)  # under 70 GiB
    assert serve_defaults("NVIDIA B200", 179 * gib) == (16384, 1024)  # 160 GiB or more
    assert serve_defaults("NVIDIA GB10", 119.7 * gib, (12, 1)) == (2048, 256)  # the memory, not the compute
    # the grid's cells: by the GPU their profile names; without --serve-defaults A100's everywhere
    assert grid.engine_of(grid.find_cell("code-synth-llama3-h100"), True) == (8192, 1024)
    assert grid.engine_of(grid.find_cell("alpaca-llama3-h200"), True) == (8192, 1024)
    assert grid.engine_of(grid.find_cell("azure"), True) == (2048, 256)
    assert grid.engine_of(grid.find_cell("alpaca-llama3-h200"), False) == (2048, 256)


def test_serve_defaults_run_every_policy_at_the_gpus_settings(tmp_path: Path) -> None:
    out, shared = tmp_path / "g", tmp_path / "shared"  # (code cells read no data)
    shared.mkdir()
    p = subprocess.run([sys.executable, str(GRID), "--shared", str(shared), "--cells", "code-synth-llama3-h100",
                        "--requests", "60", "--policies", "vllm,vllm-tuned,sjf", "--serve-defaults", "--workers", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "code-synth-llama3-h100 8192/1024" in p.stdout
    rows = json.loads((out / "results.json").read_text())
    assert {r["engine_defaults"] for r in rows} == {"vllm serve"}
    tuned = next(r for r in rows if r["policy"] == "vllm-tuned")
    assert tuned["token_budget"] in (2048, 4096, 8192)  # budgets above the cell's 1,024 sequences only
    # vllm@B at or under the cell's 1,024 sequences: one line, exit 2 (naming vllm@B/S)
    p = subprocess.run([sys.executable, str(GRID), "--shared", str(tmp_path), "--cells", "code-synth-llama3-h100",
                        "--policies", "vllm,vllm@1024", "--serve-defaults"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "runs 1024 requests at most" in p.stderr and "vllm@B/S" in p.stderr
    assert "Traceback" not in p.stderr


def test_serve_defaults_leave_a100_cells_and_the_other_systems_own_defaults(grid, monkeypatch) -> None:
    """Was: every policy of every cell at the pair, A100 cells too (Sarathi-Serve's 512 tokens
    became 2,048, V0's prompt limit 4,096 became 2,048), and sarathi a copy of vllm on H100s."""
    @dataclass(frozen=True)
    class Spec:  # spec_of reads no trace here: only the server it hands each policy is checked
        server: Server
        cost: object = None

    monkeypatch.setattr(grid, "load_trace", lambda *a: None)
    monkeypatch.setattr(grid, "RunSpec", lambda trace, cost, slo, server, **kw: Spec(server, cost))
    monkeypatch.setitem(grid._SLICE, "serve_defaults", True)
    monkeypatch.setattr(grid, "_SPECS", {})
    h100, a100 = grid.find_cell("code-synth-llama3-h100"), grid.find_cell("code-synth")
    for p in ("vllm", "ecoserve", "sjf", "orca", "s3"):
        s = grid.spec_of(h100, Path("."), 10, p).server
        assert (s.token_budget, s.max_running) == (8192, 1024), p
        s = grid.spec_of(a100, Path("."), 10, p).server
        assert (s.token_budget, s.max_running) == (None, None), p  # each policy's own, as without the option
    for p in ("sarathi", "vllm-v0"):
        s = grid.spec_of(h100, Path("."), 10, p).server
        assert (s.token_budget, s.max_running) == (None, None), p
    spec, run_as = grid.resolve(h100, "vllm@4096", Path("."), 10)
    assert run_as == "vllm" and (spec.server.token_budget, spec.server.max_running) == (4096, 1024)
