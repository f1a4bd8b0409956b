"""The scripts of benchmarks/ and training/ follow the CLIs' rules: a bad input is one line and
exit 2 (``rlpredict.cli_boundary.run_script``), and an output is written atomically, never over
an input, never over a file without ``--force``, never into a folder no tool of ours wrote
(``rlpredict.outputs``)."""

from __future__ import annotations

import ast
import gzip
import json
import multiprocessing
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlpredict.cli_boundary import (
    DEBUG_ENV,
    arg_file,
    arg_list,
    arg_number,
    child_failed,
    child_process,
    run_script,
    worker_pool,
)
from rlpredict.outputs import (
    OWNER_FILE,
    OutputError,
    atomic_path,
    check_file_output,
    mark_owned,
    output_dir,
    work_folder,
    write_owned,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_TRACE = ROOT / "ecoserve_sched" / "samples" / "azure_conv_sharegpt.jsonl.gz"  # the bundled demo trace
SCRIPTS = sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("training/*.py")])


def _main_block(path: Path) -> ast.If | None:
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return node
    return None


@pytest.mark.parametrize("path", [p for p in SCRIPTS if _main_block(p)], ids=lambda p: p.name)
def test_every_script_runs_inside_the_boundary(path: Path) -> None:
    assert ast.unparse(_main_block(path)).strip().endswith("run_script(main)"), \
        f"{path.name}: its __main__ block must be run_script(main)"
    # its options are parsed by ScriptParser: one given twice is refused, as in the two CLIs
    assert "argparse.ArgumentParser(" not in path.read_text(encoding="utf-8"), f"{path.name}: use ScriptParser"


def test_an_option_given_twice_is_refused_by_a_script(tmp_path: Path) -> None:
    """Was: argparse's rule, the last value kept without a word."""
    _usage_error(_run("benchmarks/grid_summary.py", tmp_path, "--policy", "ecoserve", "--policy", "sjf"),
                 "--policy is given more than once; give it once")
    _usage_error(_run("benchmarks/grid_summary.py", tmp_path, "--no-table", "--no-table"), "--no-table is given more")


# ---- run_script ----------------------------------------------------------------------------------
def _exit(main, capsys, monkeypatch, debug: str = "") -> tuple[int, str]:
    monkeypatch.setenv(DEBUG_ENV, debug)
    with pytest.raises(SystemExit) as e:
        run_script(main)
    return e.value.code, capsys.readouterr().err


def test_run_script_exit_codes(capsys, monkeypatch) -> None:
    def missing():
        Path("/nonexistent/file.csv").read_text()

    def bad():
        raise ValueError("data.csv:3: field 'x': not a number")

    def bug():
        raise KeyError("oops")

    def interrupted():
        raise KeyboardInterrupt

    code, err = _exit(missing, capsys, monkeypatch)
    assert code == 2 and err == "error: /nonexistent/file.csv: No such file or directory\n"
    assert _exit(bad, capsys, monkeypatch) == (2, "error: data.csv:3: field 'x': not a number\n")
    code, err = _exit(bug, capsys, monkeypatch)
    assert code == 1 and err.startswith("internal error (a bug): KeyError") and f"{DEBUG_ENV}=1" in err
    assert _exit(interrupted, capsys, monkeypatch) == (130, "interrupted: no file was left half-written\n")
    assert _exit(lambda: sys.exit("trace.csv: fewer than 2 requests\nleft"), capsys, monkeypatch) == \
        (2, "error: trace.csv: fewer than 2 requests left\n")
    assert _exit(lambda: 3, capsys, monkeypatch)[0] == 3
    assert _exit(lambda: {"rows": 1}, capsys, monkeypatch)[0] == 0  # not an int: success
    with pytest.raises(ValueError):
        _exit(bad, capsys, monkeypatch, debug="1")


# ---- outputs -------------------------------------------------------------------------------------
def test_check_file_output(tmp_path: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.json"
    src.write_text("{}\n")
    with pytest.raises(OutputError, match="also an input"):
        check_file_output(src, force=True, option="--json", inputs=[src])
    assert check_file_output(out, force=False, option="--json", inputs=[src]) == out
    out.write_text("mine")
    with pytest.raises(OutputError, match="pass --force"):
        check_file_output(out, force=False, option="--json")
    check_file_output(out, force=True, option="--json")
    with pytest.raises(OutputError, match="is a folder"):
        check_file_output(tmp_path, force=True, option="--json")


def test_work_folder_takes_a_new_folder_or_its_own(tmp_path: Path) -> None:
    new = tmp_path / "a" / "b"
    assert work_folder(new, tool="t", option="--out") == new and not new.exists()  # the first write creates it
    write_owned(new, "results.json", "{}\n", tool="t")
    write_owned(new, "plot.png", b"\x89PNG", tool="t")
    assert json.loads((new / OWNER_FILE).read_text())["files"] == ["plot.png", "results.json"]
    work_folder(new, tool="t", option="--out")  # its own: accepted again
    with pytest.raises(OutputError, match="t's output folder, not other's"):
        work_folder(new, tool="other", option="--out")  # another tool's (a trained model, a report)
    (new / "notes.txt").write_text("a user's")
    with pytest.raises(OutputError, match=r"notes\.txt"):
        work_folder(new, tool="t", option="--out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        work_folder(tmp_path / "file", tool="t", option="--out")


def test_a_rerun_replaces_its_own_folder_and_no_other(tmp_path: Path) -> None:
    out = tmp_path / "grid"
    with output_dir(out, force=False, tool="script", rerun=True) as tmp:
        (tmp / "results.json").write_text("1")
    with output_dir(out, force=False, tool="script", rerun=True) as tmp:  # its own: replaced
        (tmp / "results.json").write_text("2")
    assert (out / "results.json").read_text() == "2"
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_text("weights")
    mark_owned(model, "rlpredict train", ["model.safetensors"])
    for force in (False, True):  # another tool's folder: not even with --force
        with pytest.raises(OutputError, match="rlpredict train's output folder, not script's"), \
                output_dir(model, force=force, tool="script", rerun=True):
            pass
    assert (model / "model.safetensors").read_text() == "weights"
    model.rename(out / "model")  # another tool's folder inside the script's own: not replaced either
    for force in (False, True):  # refused alike: --force would not help (was: advised without it)
        with pytest.raises(OutputError, match=r"another run's output .*model"), \
                output_dir(out, force=force, tool="script", rerun=True):
            pass
    assert (out / "model" / "model.safetensors").read_text() == "weights"


def test_a_linked_output_folder_is_followed(tmp_path: Path) -> None:
    target, link = tmp_path / "target", tmp_path / "link"
    with output_dir(target, force=False, tool="t") as tmp:
        (tmp / "a.json").write_text("1")
    link.symlink_to(target)
    with output_dir(link, force=False, tool="t", rerun=True) as tmp:
        (tmp / "a.json").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"] and link.is_symlink()
    assert (target / "a.json").read_text() == "2"


def test_a_failed_write_leaves_no_folder(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a" / "b" / "out.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError
    with pytest.raises(RuntimeError), output_dir(tmp_path / "c" / "d", force=False, tool="t"):
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_a_child_process_ends_with_its_script(tmp_path: Path) -> None:
    marker = tmp_path / "done"
    cmd = [sys.executable, "-c", f"import time; time.sleep(5); open({str(marker)!r}, 'w')"]
    with pytest.raises(KeyboardInterrupt), child_process(cmd) as proc:
        raise KeyboardInterrupt  # the script is interrupted while its child runs
    assert proc.poll() is not None and not marker.exists()
    with pytest.raises(SystemExit, match="stage build: bad seed"):
        child_failed("stage build", 2, "error: bad seed\n")
    with pytest.raises(RuntimeError, match="stage build: internal error"):
        child_failed("stage build", 1, "internal error (a bug): KeyError\n")


def test_pool_workers_leave_interrupts_to_the_script_and_die_with_it() -> None:
    before = set(multiprocessing.active_children())
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt), worker_pool(1) as pool:
        assert list(pool.map(abs, [-1, 2])) == [1, 2]
        assert pool.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN
        pool.submit(time.sleep, 60)
        time.sleep(0.2)
        raise KeyboardInterrupt
    assert time.monotonic() - t0 < 30  # not the 60 s of the running task
    assert not set(multiprocessing.active_children()) - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
@pytest.mark.parametrize("first", ["main", "thread"])
def test_pool_workers_die_when_the_script_is_killed(tmp_path: Path, method: str, first: str) -> None:
    """A SIGKILL of the main process (which no handler sees) used to leave its workers, which
    ignore the stop signals, waiting forever (a reviewer's find); they now die with it, under
    every start method (was: not under a forkserver, Python 3.14's default on Linux) and
    whichever thread started them (was: a pool first used from a helper thread lost its workers
    when that thread ended, the kernel's parent-death signal following the thread)."""
    script = tmp_path / "s.py"
    script.write_text("import multiprocessing as mp, os, threading, time\n"
                      "from rlpredict.cli_boundary import worker_pool\n"
                      "if __name__ == '__main__':\n"
                      f"    mp.set_start_method({method!r})\n"
                      "    with worker_pool(2) as pool:\n"
                      f"        if {first!r} == 'thread':\n"
                      "            t = threading.Thread(target=lambda: list(pool.map(time.sleep, [0.2] * 4)))\n"
                      "            t.start()\n            t.join()\n"
                      "        pids = set(pool.map(os.getpid, [], timeout=60)) | {pool.submit(os.getpid).result()\n"
                      "                                                          for _ in range(4)}\n"
                      "        time.sleep(0.5)  # past the helper thread's end\n"
                      "        pids |= {f.result() for f in [pool.submit(os.getpid) for _ in range(4)]}\n"
                      "        print(' '.join(map(str, pids)), flush=True)\n"
                      "        pool.submit(time.sleep, 120)\n        time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    pids = [int(x) for x in line.split()]
    if not pids:
        proc.kill()
        raise AssertionError(proc.stderr.read())
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 20
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in pids if _alive(p)]
    assert not alive, f"workers {alive} outlived their killed main process"


def test_the_parent_watch_is_nothing_outside_a_pool() -> None:
    code = "from rlpredict.cli_boundary import _die_with_parent; _die_with_parent(); print('alive')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == "alive\n"


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_pool_works_under_every_start_method(method: str) -> None:
    """Under a forkserver (Python 3.14's default on Linux) a worker's parent is the server, not
    the script: the parent watch follows the script (was, with the kernel's parent-death
    signal: every worker exited at once)."""
    code = ("import multiprocessing as mp\nif __name__ == '__main__':\n"
            f"    mp.set_start_method({method!r})\n"
            "    from rlpredict.cli_boundary import worker_pool\n"
            "    with worker_pool(2) as pool:\n        print(list(pool.map(abs, range(-2, 2))))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.stdout == "[2, 1, 0, 1]\n", p.stderr


def _alive(pid: int) -> bool:
    """``pid`` is a running process (not a zombie waiting for its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_closed_pipe_ends_quietly(capsys, monkeypatch) -> None:
    def piped():
        raise BrokenPipeError(32, "Broken pipe")  # what print raises once `| head` has left

    assert _exit(piped, capsys, monkeypatch) == (141, "")


def test_argparse_types() -> None:
    import argparse

    assert arg_number(int, 1)("3") == 3 and arg_list(arg_number(float, 0, low_open=True))("0.5, 2") == [0.5, 2.0]
    for parse, text in ((arg_number(int, 1), "0"), (arg_number(int, 1), "x"), (arg_number(float, 0, 1), "nan"),
                        (arg_number(float, 0, low_open=True), "0"), (arg_list(str), ","),
                        (arg_number(float), "0_5"), (arg_number(int), "\u0663"),  # were 5.0 and 3
                        (arg_list(str), "a,,b"), (arg_list(str), "vllm,vllm"),  # were a,b and vllm twice
                        (arg_list(arg_number(float)), "1, 1.0"),
                        (arg_file, "out/"), (arg_file, " ")):  # was: a file named "out" written
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    assert arg_file("runs/x.json") == Path("runs/x.json")


# ---- the scripts themselves, as a user runs them -----------------------------------------------------
def _run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def _one_error(res: subprocess.CompletedProcess, *parts: str) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("error: ") and all(p in res.stderr for p in parts), res.stderr


def test_a_missing_input_is_one_line(tmp_path: Path) -> None:
    _one_error(_run("benchmarks/sim_speed.py", "--trace", tmp_path / "none.csv"), "none.csv")


@pytest.mark.parametrize("args", [("benchmarks/sim_speed.py", "--trace"),
                                  ("benchmarks/sim_speed_ab.py", "--trace", "--before", "."),
                                  ("benchmarks/sim_compare.py", "--trace"),
                                  ("benchmarks/sim_vs_vllm.py", "--trace"),
                                  ("benchmarks/predictor_speed.py", "--data"),
                                  ("benchmarks/sim_cost_model_check.py", "--profiles-dir"),
                                  ("benchmarks/serving_gain.py", "--shared")])
def test_the_shared_data_is_read_only_where_it_is_named(args) -> None:
    """No script reads the shared data folder unless told: without its input or ``--shared``, a
    usage error that names the option (was: a default folder beside the checkout)."""
    script, option, *rest = args
    _usage_error(_run(script, *rest), option, "--shared")


def test_policy_names_are_checked_before_the_work() -> None:
    res = _run("benchmarks/sim_vs_transformers.py", "--policies", "ecoserve,nosuch")
    assert res.returncode == 2 and "unknown nosuch; choose from" in res.stderr and "ecoserve, ecoserve-" in res.stderr


def _usage_error(res: subprocess.CompletedProcess, *parts: str) -> None:
    """argparse's refusal: exit 2, its usage line and one error line, no traceback."""
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert all(p in res.stderr.splitlines()[-1] for p in parts), res.stderr


@pytest.mark.parametrize("args", [("benchmarks/split_leak.py", "--data", ""),
                                  ("benchmarks/quantile_coverage.py", "--data", " "),
                                  ("training/compare_losses.py", "--data", ""),
                                  ("benchmarks/sim_speed.py", "--trace", ""),
                                  ("training/make_samples.py", "--shared", "")])
def test_a_blank_path_is_refused(args) -> None:
    """An unset variable (``--data "$LOGS"``) was the current folder, whose files were read."""
    _usage_error(_run(*args), args[1], "empty path")


def test_a_file_given_twice_and_bad_counts_are_refused(tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "p", "response": "r"}\n')
    for script in ("benchmarks/split_leak.py", "benchmarks/quantile_coverage.py", "benchmarks/template_skew.py"):
        _usage_error(_run(script, "--data", data, "--data", tmp_path / "." / "rows.jsonl"), "given twice")  # was: counted twice
    for option, value in (("--n", "0"), ("--every", "-2")):  # was: a TypeError, "a bug"
        _usage_error(_run("benchmarks/template_skew.py", "--data", data, option, value), option)
    _usage_error(_run("benchmarks/attainment_curve.py", "--shared", tmp_path, "--cell", "azure", "--points", "100000000"),
                 "--points")


def test_recipes_name_a_bad_row(tmp_path: Path) -> None:
    """The recipes read rows through ``rows_with`` with their fields' types (was: a KeyError or
    TypeError, "a bug"; make_samples.py's own run would replace the bundled samples, so its
    reader is tested here)."""
    from rlpredict.records import RecordError, rows_with
    from training.make_samples import _messages

    gz = tmp_path / "s.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"conversation_id": "a", "conversation": []}\n'
                                 b'{"conversation_id": "b", "conversation": [{"role": "user"}]}\n'))
    with pytest.raises(RecordError, match=r"s\.jsonl\.gz:2: field 'conversation': .*string 'content'"):
        list(rows_with(gz, {"conversation_id": str, "conversation": list}, _messages))
    gz.write_bytes(gzip.compress(b'{"conversation_id": 1, "conversation": []}\n'))
    with pytest.raises(RecordError, match=r":1: field 'conversation_id': must be a string, got a number"):
        list(rows_with(gz, {"conversation_id": str, "conversation": list}))
    gz.write_bytes(gzip.compress(b'{"x": 3, "y": 2.5}\n'))  # a number field takes 3; an integer one not 2.5
    assert list(rows_with(gz, {"x": float})) == [{"x": 3, "y": 2.5}]
    with pytest.raises(RecordError, match=r"field 'y': must be a string or an integer, got a number with a fraction"):
        list(rows_with(gz, {"y": (str, int)}))
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"x": null}\n')
    _one_error(_run("training/heldout_rows.py", f"{ids}:x", "--out", tmp_path / "o.jsonl"),  # was: hashed "None"
               "ids.jsonl:1", "'x'", "must be a string or an integer, got null")


def test_compare_losses_refuses_a_held_out_side_it_cannot_score(tmp_path: Path) -> None:
    """Refused before any training (was: every variant trained, then NaN scores, exit 0, and a
    --json file with bare NaN in it)."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p {i}", "rl_tokens": n}) + "\n"
                            for i, n in enumerate([10, 500, 3000, 20, 700])))
    _one_error(_run("training/compare_losses.py", "--data", data, "--rows", "5", "--json", tmp_path / "o.json"),
               "the held-out side has 0 row(s) of 5: at least 2 are needed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]
    res = _run("training/compare_losses.py", "--data", data, "--eval-rows", "1")  # (was: scored one row,
    assert res.returncode == 2 and "--eval-rows" in res.stderr  # a tau of "0")


def test_heldout_rows_never_writes_over_its_input(tmp_path: Path) -> None:
    src = tmp_path / "rows.jsonl.gz"
    rows = [{"conversation_id": f"c{i}", "prompt": "p", "response": "r"} for i in range(200)]
    src.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    before = src.read_bytes()
    _one_error(_run("training/heldout_rows.py", f"{src}:conversation_id", "--out", src, "--force"), "also an input")
    assert src.read_bytes() == before
    out = tmp_path / "held.jsonl"
    _one_error(_run("training/heldout_rows.py", f"{src}:nofield", "--out", out), "rows.jsonl.gz:1", "nofield")
    assert not out.exists()  # nothing half-written
    assert _run("training/heldout_rows.py", f"{src}:conversation_id", "--out", out).returncode == 0
    written = out.read_bytes()
    _one_error(_run("training/heldout_rows.py", f"{src}:conversation_id", "--out", out), "--force")
    assert out.read_bytes() == written
    # a test fraction above training's 0.9 (1: every row held out) was taken (a reviewer's find)
    res = _run("training/heldout_rows.py", f"{src}:conversation_id", "--out", tmp_path / "all.jsonl", "--test-frac", "0.95")
    assert res.returncode == 2 and "argument --test-frac: must be in (0, 0.9], got 0.95" in res.stderr
    assert not (tmp_path / "all.jsonl").exists()


def test_an_output_folder_of_the_user_is_refused_before_the_work(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("a user's")
    grid = ("benchmarks/scenario_grid.py", "--shared", tmp_path / "data", "--out", out)
    _one_error(_run(*grid), "notes.txt")  # --force would not help: not advised (was: "exists; pass --force")
    _one_error(_run(*grid, "--force"), "notes.txt")  # --force replaces only a folder of ours
    _one_error(_run("benchmarks/serving_gain.py", "--shared", tmp_path / "data", "--out", out), "notes.txt")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["notes.txt"]


def test_no_output_is_written_into_the_shared_data(tmp_path: Path) -> None:
    """Results are not written inside the data folder a script reads (a reviewer's `--out
    DATA/sg` and `--json DATA/x.json` were written into the --shared folder DATA)."""
    data = tmp_path / "data"
    data.mkdir()
    _one_error(_run("benchmarks/scenario_grid.py", "--shared", data, "--out", data / "sg"), "lies inside the input")
    _one_error(_run("benchmarks/serving_gain.py", "--shared", data, "--out", data / "sg"), "lies inside the input")
    _one_error(_run("training/make_demo_trace.py", "--shared", data, "--out", data / "t.jsonl.gz"), "lies inside")
    assert list(data.iterdir()) == []


def test_a_wrong_shared_folder_or_an_empty_cell_is_named(tmp_path: Path) -> None:
    """Were "--shared/README.md/azure...: no such trace file", "exists; pass --force" for a
    missing --shared, and "--cells:  given twice" for an empty name."""
    f = tmp_path / "README.md"
    f.write_text("x")
    _usage_error(_run("benchmarks/sim_speed.py", "--shared", f), "--shared", "is not a folder")
    _usage_error(_run("training/make_samples.py", "--shared", tmp_path / "nope"), "--shared", "is not a folder")
    _usage_error(_run("benchmarks/scenario_grid.py", "--shared", tmp_path, "--cells", ","), "an empty cell name")


def test_serving_gain_report_refuses_what_it_did_not_write(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for text in ('{"rows": []}', '{"traces": {}}', '{"traces": {"x": 1}}'):
        (run / "results.json").write_text(text)
        _one_error(_run("benchmarks/serving_gain.py", "--report", run, "--plot", tmp_path / "p.png"), "no 'traces'")
    assert not (tmp_path / "p.png").exists()
    _one_error(_run("benchmarks/serving_gain.py", "--report", run, "--plot", run / "results.json", "--force"),
               "also an input")


def test_sim_vs_vllm_takes_the_kv_size_and_sim_vs_transformers_the_device() -> None:
    pytest.importorskip("vllm")
    res = _run("benchmarks/sim_vs_vllm.py", "--trace", SAMPLE_TRACE, "--max-requests", "40", "--rate-scales", "0.4", "--pairs",
               "vllm,ecoserve-recompute", "--kv-blocks", "300")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "KV 300 blocks of 16 tokens" in res.stdout and "| 0.4 | vllm | vllm-real | preemptions |" in res.stdout
    # EcoServe as the plug-in runs it (recompute only) against the plug-in
    assert "| 0.4 | ecoserve-recompute | ecoserve-vllm-real | preemptions |" in res.stdout
    _one_error(_run("benchmarks/sim_vs_transformers.py", "--device", "tpu"), "--device 'tpu'")


def test_sim_vs_vllm_checks_a_grid_cell_request_by_request(tmp_path: Path) -> None:
    """``--cell``: a scenario-grid cell's trace, profile, SLO and KV cache (the code cells draw
    their trace, so an empty --shared folder does), loads as shares of its ceiling, and each
    pair's requests compared one by one."""
    pytest.importorskip("vllm")
    res = _run("benchmarks/sim_vs_vllm.py", "--shared", tmp_path, "--cell", "code-synth-tbt100", "--max-requests",
               "60", "--ceiling-shares", "0.9", "--pairs", "vllm,ecoserve-recompute")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "cell code-synth-tbt100 (first 60 requests" in res.stdout and "SLO 5 s / 0.1 s" in res.stdout
    assert "saturation ceiling at rate scale" in res.stdout
    for pair in ("vllm | vllm-real", "ecoserve-recompute | ecoserve-vllm-real"):
        assert f"| {pair} | requests apart (of 60) | 0 | | |" in res.stdout, res.stdout
    for args, parts in ((("--profile", "llama3-8b-h200"), ("--profile is not taken",)),
                        (("--trace", tmp_path / "t.csv"), ("--trace is not taken",)),
                        (("--rate-scales", "1", "--ceiling-shares", "0.5"), ("not both",))):
        _usage_error(_run("benchmarks/sim_vs_vllm.py", "--shared", tmp_path, "--cell", "code-synth", *args), *parts)
    _usage_error(_run("benchmarks/sim_vs_vllm.py", "--cell", "code-synth"), "--cell needs --shared")
    _usage_error(_run("benchmarks/sim_vs_vllm.py", "--shared", tmp_path, "--cell", "nosuch"), "unknown cell 'nosuch'")


def test_sim_vs_vllm_replays_vllms_asynchronous_loop_beside_the_simulator() -> None:
    pytest.importorskip("vllm")
    res = _run("benchmarks/sim_vs_vllm.py", "--trace", SAMPLE_TRACE, "--max-requests", "30", "--rate-scales", "0.4",
               "--pairs", "vllm-async,ecoserve-async")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| 0.4 | vllm | async-vllm-real | requests apart (of 30) |" in res.stdout
    assert "| 0.4 | ecoserve-recompute | ecoserve-async-vllm-real | mean_jct_s |" in res.stdout


@pytest.fixture()
def serving_gain():
    """``benchmarks/serving_gain.py`` as a module, importable by its worker processes (they
    unpickle its jobs by module name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serving_gain", ROOT / "benchmarks" / "serving_gain.py")
    sg = importlib.util.module_from_spec(spec)
    sys.modules["serving_gain"] = sg
    try:
        spec.loader.exec_module(sg)
        yield sg
    finally:
        sys.modules.pop("serving_gain", None)


def _serving_gain_results(sg, ceiling: float | None, **top: object) -> dict:
    """A results.json of ``serving_gain.py`` with one trace (figures made up, shapes real)."""
    case = {"capacity": 0.5, "capacity_x_vllm": 1.25, "jct_x_vllm": 0.9, "coverage": 0.7, "reserved_over_actual": 1.4}
    modes = ["bucket"] + [sg.quantile_tag(q) for q in sg.QUANTILES]
    trace = {"requests": 10, "vllm": {"capacity": 0.4, "mean_jct_s": 9.0, "preemptions": 3},
             "ecoserve": {**{f"{n}/bucket": case for n in sg.PREDICTORS}, **{f"minilm/{m}": case for m in modes}}}
    if ceiling is not None or top:
        trace.update(ceiling=ceiling, **top)
    metrics = {n: {"bucket_acc": 0.3, "within1_acc": 0.6, "mae": 120.0, "kendall_tau": 0.4}
               for n in sg.PREDICTORS if n != "oracle"}
    return {"profile": "p", "gpu_memory_utilization": 0.9, "kv_cache_tokens": 1000, "slo": [5, 0.2],
            "heldout_turns": 10, "predictor_metrics": metrics, "traces": {"azure": trace}}


def test_serving_gain_states_the_saturation_ceiling(serving_gain) -> None:
    sg = serving_gain
    text = sg.markdown(_serving_gain_results(sg, 0.5, ceiling_saturated=True, ceiling_note=None))
    assert "azure: x0.500 trace rate; vLLM 0.80 of the ceiling, EcoServe with the shipped bundle (minilm) 1.00 " \
        "of the ceiling, with the oracle 1.00 of the ceiling" in text
    lower = sg.markdown(_serving_gain_results(sg, 0.5, ceiling_saturated=False, ceiling_note="kept up"))
    assert "x0.500 trace rate (a lower bound: kept up)" in lower
    none = sg.markdown(_serving_gain_results(sg, None, ceiling_saturated=None, ceiling_note="every one was dropped"))
    assert "azure: none (every one was dropped)" in none and "of the ceiling" not in none
    old = _serving_gain_results(sg, None)  # a results.json written before the ceiling: --report still reads it
    assert "Saturation ceiling" not in sg.markdown(old) and "| constant |" in sg.markdown(old)
    sg.plot([old])


def _tiny_trace(n: int = 60):
    import numpy as np

    from ecoserve_sched.trace import Trace

    rng = np.random.default_rng(0)
    out = rng.integers(20, 300, n)
    rows = np.stack([np.zeros(n, dtype=np.int64), out, out], axis=1)
    return Trace("tiny", np.sort(rng.uniform(0, 60, n)), rng.integers(50, 600, n), out, np.full(n, 2048), rows), rows


def test_serving_gain_runs_the_same_cases_in_parallel_as_in_one_process(serving_gain) -> None:
    import numpy as np

    from ecoserve_sched.compare import RunSpec
    from ecoserve_sched.cost_model import load_profile
    from ecoserve_sched.request import SLO

    sg = serving_gain
    tr, rows = _tiny_trace()
    cost, slo = load_profile("llama2-13b-a100-80gb"), SLO(5.0, 0.2)
    cost.gpu_memory_utilization = 0.4  # a small cache: the loads matter
    spec = RunSpec(tr, cost, slo, predictions="annotated")
    vllm1, top1 = sg.baseline(spec, 1)
    vllm2, top2 = sg.baseline(spec, 2)
    assert vllm1 == vllm2 and top1 == top2 and set(top1) == {"ceiling_rate_scale", "saturated", "note"}
    rows_of = {"oracle/bucket": rows, "constant/bucket": np.stack([rows[:, 0], np.full(len(rows), 150),
                                                                   np.full(len(rows), 300)], axis=1)}
    logged: list[str] = []
    one = sg.serve_cases(tr, rows_of, cost, slo, vllm1, top1["ceiling_rate_scale"], 1, log=logged.append)
    two = sg.serve_cases(tr, rows_of, cost, slo, vllm1, top1["ceiling_rate_scale"], 2, log=logged.append)
    assert one == two and list(one) == list(rows_of)
    assert [line.split()[0] for line in logged] == ["oracle", "constant"] * 2  # in the cases' order
    assert one["oracle/bucket"]["coverage"] == 1.0


def test_serving_gain_names_a_search_that_found_no_capacity(serving_gain) -> None:
    sg = serving_gain
    tr, _ = _tiny_trace()
    bound = {"max_rate_scale": None, "search": "no_failing_load", "lower_bound": 64.0,
             "note": "the trace is too small or light to load the server"}
    with pytest.raises(ValueError, match=r"tiny: vllm's capacity search found no capacity \(> 64: the trace is"):
        sg._found(bound, "vllm", tr)


def test_a_script_annotates_again_into_its_own_folder(tmp_path: Path) -> None:
    """A script's folder lists the annotated trace as its output; a second run replaces it (the
    annotate call is the script's: ``owner``), where a user's command would be refused."""
    for _ in range(2):
        res = _run(ROOT / "benchmarks" / "large_trace.py", "--rows", "300", "--stages", "build,annotate",
                   "--out", tmp_path / "lt")
        assert res.returncode == 0, res.stderr
        assert "| 300 | annotate |" in res.stdout


def test_serving_gain_refuses_a_bundle_of_another_split_or_tokenizer(serving_gain, capsys) -> None:
    """The held-out side is the shipped recipe's split in Llama-3 tokens: a bundle that recorded
    another split was scored on rows it trained on, without a word (a reviewer's find). A
    response longer than max_tokens is said."""
    from types import SimpleNamespace

    import numpy as np

    sg = serving_gain

    def bundle(split: dict, tok: str = "llama3") -> SimpleNamespace:
        return SimpleNamespace(bundle=SimpleNamespace(manifest={"evaluation": {"split": split}}, rl_tokenizer=tok))

    sg.check_bundle(bundle({"mode": "test", "test_frac": 0.1, "seed": 0}), None)  # the shipped bundle's record
    with pytest.raises(ValueError, match=r"this script's split seed 0 differs from the split the bundle recorded"):
        sg.check_bundle(bundle({"mode": "test", "test_frac": 0.1, "seed": 1}), None)
    with pytest.raises(ValueError, match=r"counts response lengths in 'gpt2'"):
        sg.check_bundle(bundle({"mode": "test", "test_frac": 0.1, "seed": 0}, "gpt2"), None)
    tr = sg.Trace("t", np.arange(3.0), np.ones(3, dtype=np.int64), np.array([5, 3000, 20307]),
                  np.full(3, sg.MAX_TOKENS, dtype=np.int64))
    sg.say_cut(tr)
    assert "2 response(s) longer than max_tokens 2048 stop there in the replays (longest 20307 tokens)" \
        in capsys.readouterr().out


def test_annotate_scale_runs_and_reruns(tmp_path: Path) -> None:
    """Its folder lists each output's rejects before the child writes them, and the rejects
    check refused the script's own record: every run failed (a reviewer's find). A rerun
    replaces its own files."""
    for _ in range(2):
        res = _run("benchmarks/annotate_scale.py", "--rows", "30", "--configs", "local", "--dir", tmp_path / "as")
        assert res.returncode == 0, res.stderr
        assert "| local | 1 process x" in res.stdout
    assert (tmp_path / "as" / "trace-30.local.jsonl.gz").exists()


def test_sim_speed_ab_names_a_worker_that_died(tmp_path: Path) -> None:
    """A tree whose package fails to import: the worker exits, and the error said "Expecting
    value: line 1 column 1" (a reviewer's find); it names the tree now."""
    import importlib.util
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("sim_speed_ab", ROOT / "benchmarks" / "sim_speed_ab.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    (tmp_path / "ecoserve_sched").mkdir()
    (tmp_path / "ecoserve_sched" / "__init__.py").write_text("raise ImportError('broken on purpose')\n")
    worker = ab.Worker(tmp_path, SimpleNamespace(trace="t.csv", profile="p", confusion="c.json"))
    with pytest.raises(RuntimeError, match=f"the worker for the tree {tmp_path} exited \\(rc 1\\)"):
        worker.ask(cmd="run")


def test_benchmark_options_a_reviewer_found_ignored_or_unchecked(tmp_path: Path) -> None:
    """--model beside --bundle was ignored; --threads above the cores was taken and printed;
    an empty --data gave an internal error after the table's header."""
    res = _run("benchmarks/predictor_speed.py", "--bundle", ROOT / "models" / "rl-minilm-l6-llama3", "--model",
               tmp_path / "none", "--data", ROOT / "rlpredict" / "samples" / "sharegpt_sample.jsonl.gz")
    assert res.returncode == 2 and "--model and --bundle: give one" in res.stderr
    res = _run("benchmarks/large_trace.py", "--rows", "10", "--threads", "100000", "--out", tmp_path / "lt")
    assert res.returncode == 2 and "argument --threads: must be in [1, " in res.stderr
    (tmp_path / "empty.jsonl").write_text("")
    _one_error(_run("benchmarks/template_skew.py", "--data", tmp_path / "empty.jsonl", "--n", "3"),
               "empty.jsonl: no prompts to compare")
