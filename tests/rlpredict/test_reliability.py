"""The reliability rules at the CLI boundary: no user file is deleted or overwritten, every bad
option or input is one line and exit 2, bundles are checked beyond their hashes, SIGTERM
cleans up like Ctrl-C. (Fuzzing of the row readers: test_fuzz.py; determinism:
test_determinism.py.)"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from rlpredict.cli import app
from rlpredict.outputs import OWNER_FILE, OutputError, check_paths, output_dir
from rlpredict.serve.bundle import BundleError, load_bundle
from rlpredict.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
ROWS = [{"id": i, "prompt": f"Write {i} short lines about the sea"} for i in range(5)]


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(res, *needles: str) -> None:
    """Exit 2, one ``error:`` line naming what is wrong, no traceback."""
    assert res.exit_code == 2, res.output
    assert ("Traceback" not in res.output and res.exception is None) or isinstance(res.exception, SystemExit)
    for n in needles:
        assert n in res.output, (n, res.output)


@pytest.fixture
def trace(tmp_path) -> Path:
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return p


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- outputs never collide with inputs, never replace a user's file ------------------------------
def test_annotate_refuses_every_collision_and_existing_outputs(trace, tmp_path):
    before = snapshot(tmp_path)
    one_error_line(run("annotate", trace, "-o", trace), "also an input")
    one_error_line(run("annotate", trace, "-o", tmp_path / "o.jsonl", "--on-error", "skip", "--rejects", trace),
                   "--rejects is also an input")
    one_error_line(run("annotate", trace, "-o", tmp_path / "o.jsonl", "--on-error", "skip",
                       "--rejects", tmp_path / "o.jsonl"), "are the same path")
    # the default rejects name (OUTPUT's name + .rejects.jsonl) is the input
    src = tmp_path / "x.rejects.jsonl"
    shutil.copy(trace, src)
    one_error_line(run("annotate", src, "-o", tmp_path / "x.jsonl", "--on-error", "skip"), "also an input")
    (tmp_path / "dir.jsonl").mkdir()
    one_error_line(run("annotate", trace, "-o", tmp_path / "dir.jsonl"), "is a folder")
    # an existing output (or rejects file) is replaced only with --force
    mine = tmp_path / "mine.jsonl"
    mine.write_text("my file\n")
    one_error_line(run("annotate", trace, "-o", mine), "exists; pass --force")
    (tmp_path / "dangling.jsonl").symlink_to(tmp_path / "nowhere.jsonl")  # was: replaced without --force
    one_error_line(run("annotate", trace, "-o", tmp_path / "dangling.jsonl"), "exists; pass --force")
    assert (tmp_path / "dangling.jsonl").is_symlink()
    (tmp_path / "o.rejects.jsonl").write_text("my notes\n")
    one_error_line(run("annotate", trace, "-o", tmp_path / "o.jsonl", "--on-error", "skip"), "--rejects")
    assert mine.read_text() == "my file\n" and (tmp_path / "o.rejects.jsonl").read_text() == "my notes\n"
    assert all(snapshot(tmp_path)[k] == v for k, v in before.items())
    res = run("annotate", trace, "-o", mine, "--force", "--no-progress")
    assert res.exit_code == 0, res.output
    assert [json.loads(line)["id"] for line in mine.read_text().splitlines()] == [r["id"] for r in ROWS]


def test_train_never_deletes_a_users_folder(trace, tmp_path):
    data_dir = tmp_path / "logs"
    data_dir.mkdir()
    data = data_dir / "chats.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    before = snapshot(tmp_path)
    # --out holding the training data: refused even with --force
    one_error_line(run("train", "--data", data, "--out", data_dir, "--force"), "holds the input")
    # an existing folder holding the user's files: refused with or without --force, alike (was:
    # "exists; pass --force" without it, advice certain to fail)
    notes = tmp_path / "work"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    one_error_line(run("train", "--data", data, "--out", notes), "no tool of ours wrote", "notes.txt")
    one_error_line(run("train", "--data", data, "--out", notes, "--force"), "no tool of ours wrote", "notes.txt")
    one_error_line(run("train", "--data", data, "--out", trace), "is a file")
    assert snapshot(tmp_path) == {**before, "work/notes.txt": b"mine"}


def test_a_full_disk_names_the_output_never_its_temporary_folder(tmp_path):
    """A full disk inside ``output_dir`` names the output, never its temporary folder (was:
    ``eval`` said ``.report.x1y2.part/confusion_model.png``), and a safetensors error caused by
    one is that ``OSError`` (was: ``train`` ended as an internal error, exit 1)."""
    import errno

    from safetensors import SafetensorError

    out = tmp_path / "report"
    with pytest.raises(OSError) as e, output_dir(out, force=False, tool="t") as tmp:
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "plots" / "a.png"))
        full.names_output = True  # as ``write_text_atomic`` names the file it wrote
        raise full
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(out / "plots" / "a.png")
    with pytest.raises(OSError) as e, output_dir(out, force=False, tool="t"):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(out)
    with pytest.raises(SafetensorError), output_dir(out, force=False, tool="t"):  # not an OS error: as it came
        raise SafetensorError("Error while deserializing header: HeaderTooLarge")
    with pytest.raises(OSError) as e, output_dir(out, force=False, tool="t"):  # tokenizers' save: a bare Exception
        raise Exception("No space left on device (os error 28)")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(out)
    with pytest.raises(OSError, match=r"torch could not write a file .* is the disk full") as e, \
            output_dir(out, force=False, tool="t"):  # torch.save's zip writer names no cause
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 297984 vs 297876")
    assert e.value.filename == str(out)
    with pytest.raises(RuntimeError, match="boom"), output_dir(out, force=False, tool="t"):
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_a_full_disk_naming_no_file_names_the_temporary_folder_where_that_is_the_fuller_disk(tmp_path, monkeypatch):
    """``export --int8`` with a full ``$TMPDIR`` (onnxruntime's quantizer writes there, and its
    error names no file) blamed ``--out``, whose disk had room."""
    import errno
    import shutil
    import tempfile
    from collections import namedtuple

    from rlpredict.outputs import naming

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    real_stat = os.stat
    usage = namedtuple("usage", "total used free")

    def stat(p, *a, **k):
        st = real_stat(p, *a, **k)
        return os.stat_result((*st[:2], st.st_dev + 1, *st[3:])) if Path(p) == scratch else st

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(scratch))
    monkeypatch.setattr(os, "stat", stat)
    for free, want in ((0, f"{scratch} (the temporary folder)"), (1 << 40, str(tmp_path / "out"))):
        monkeypatch.setattr(shutil, "disk_usage", lambda p, f=free: usage(1 << 41, 0, f if Path(p) == scratch else 1 << 30))
        with pytest.raises(OSError) as e, naming(tmp_path / "out"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        assert e.value.filename == want


def test_output_dir_replaces_only_what_a_tool_wrote(tmp_path):
    out = tmp_path / "report"
    with output_dir(out, force=False, tool="t") as tmp:
        (tmp / "a.json").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / OWNER_FILE).write_text(json.dumps({"files": ["b.png"]}))
        (tmp / "sub" / "b.png").write_text("2")
    with pytest.raises(OutputError, match="exists; pass --force"), output_dir(out, force=False, tool="t"):
        pass
    with output_dir(out, force=True, tool="t") as tmp:  # ours entirely (nested folder too)
        (tmp / "a.json").write_text("3")
    assert (out / "a.json").read_text() == "3" and not (out / "sub").exists()
    (out / "user.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"user\.txt"), output_dir(out, force=True, tool="t"):
        pass
    with pytest.raises(RuntimeError), output_dir(tmp_path / "new", force=False, tool="t") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")  # an error leaves nothing behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    assert (out / "user.txt").read_text() == "mine"
    (out / "user.txt").unlink()
    with output_dir(out / "run2", force=False, tool="t") as tmp:  # another run saved inside it
        (tmp / "c.json").write_text("4")
    with pytest.raises(OutputError, match=r"another run's output .*run2"), output_dir(out, force=True, tool="t"):
        pass  # was: --force deleted it with the folder
    assert (out / "run2" / "c.json").read_text() == "4"


def test_a_replaced_folder_that_cannot_be_removed_is_named(tmp_path, monkeypatch, capsys):
    """``--force`` over a folder whose old contents cannot all be deleted (a protected file in
    it): the new folder is in place and a note names where the old one was moved (was: a hidden
    ``.NAME.XXXXXXXX.old`` folder left beside it each run, without a word)."""
    out = tmp_path / "report"
    with output_dir(out, force=False, tool="t") as tmp:
        (tmp / "a.json").write_text("1")

    def refuse(path, *a, **kw):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", refuse)
    with output_dir(out, force=True, tool="t") as tmp:
        (tmp / "a.json").write_text("2")
    assert (out / "a.json").read_text() == "2"
    left = [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
    assert len(left) == 1 and (left[0] / "a.json").read_text() == "1"
    err = capsys.readouterr().err
    assert f"note: {out} was replaced; its old contents, moved to {left[0]}, could not all be removed" in err


def test_long_output_names_are_refused_before_the_work_and_written_when_legal(tmp_path):
    """A name the file system takes (255 bytes) is written, though its temporary name is
    longer than that (was: the write failed at the end, naming the temporary file); a longer
    one is refused before any work (``check_parent``)."""
    from rlpredict.outputs import check_new_file, write_text_atomic

    legal = tmp_path / ("a" * 250 + ".json")
    check_new_file(legal, force=False, option="--out")
    write_text_atomic(legal, "x")
    assert legal.read_text() == "x" and [p.name for p in tmp_path.iterdir()] == [legal.name]
    with output_dir(tmp_path / ("d" * 255), force=False, tool="t") as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(OutputError, match=r"is 256 bytes long, more than this file system takes"):
        check_new_file(tmp_path / ("b" * 251 + ".json"), force=False, option="--out")


def test_a_blank_output_path_is_refused_as_such(tmp_path, monkeypatch):
    """A blank path (an unset ``$VAR`` beside a space) is refused, not made into a folder
    named " " (was: ``ecoserve compare --out " "`` wrote its report there, exit 0)."""
    from rlpredict.outputs import check_new_dir, check_new_file, check_parent

    monkeypatch.chdir(tmp_path)
    for check in (check_new_dir, check_new_file):
        with pytest.raises(OutputError, match=r"^--out is blank \(' '\): give a path$"):
            check(Path(" "), force=True, option="--out")
    with pytest.raises(OutputError, match="is blank"):
        check_parent("\t", "--out")
    assert list(tmp_path.iterdir()) == []
    check_new_file(tmp_path / " a", force=False, option="--out")  # (a name with a space is a name)


def test_a_blank_compare_out_exits_2_with_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ecoserve_sched.cli import app

    monkeypatch.chdir(tmp_path)
    Path("t.csv").write_text("arrival_time_s,input_tokens,output_tokens\n0,100,10\n")
    r = CliRunner().invoke(app, ["compare", "--trace", "t.csv", "--policies", "vllm", "--rate-scales", "1",
                                 "--out", " "])
    assert r.exit_code == 2 and "--out is blank" in r.output and sorted(os.listdir()) == ["t.csv"], r.output


def test_outputs_get_the_modes_of_a_plain_write(tmp_path):
    """Temporary files and folders are private (0600/0700); what lands gets the umask's modes."""
    from rlpredict.outputs import _UMASK, check_new_file, write_text_atomic

    write_text_atomic(tmp_path / "f.txt", "x")
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~_UMASK
    with output_dir(tmp_path / "d", force=False, tool="t") as tmp:
        (tmp / "a").write_text("1")
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~_UMASK
    with pytest.raises(OutputError, match=r"parent .* is a file"):  # before any work is done
        check_new_file(tmp_path / "f.txt" / "out.json", force=False, option="--out")


def test_a_file_another_tool_listed_is_not_replaced_even_with_force(tmp_path):
    """A file output inside a folder a tool of ours wrote, where that folder's record lists it:
    refused even with --force (was: replaced, then deleted without a word by that tool's rerun)."""
    from rlpredict.outputs import OWNER_FILE, check_new_file

    with output_dir(tmp_path / "grid", force=False, tool="scenario_grid") as tmp:
        (tmp / "results.md").write_text("table")
    for name in ("results.md", OWNER_FILE):
        with pytest.raises(OutputError, match=r"is scenario_grid's output \(listed in .*rerun"):
            check_new_file(tmp_path / "grid" / name, force=True, option="--out")
    check_new_file(tmp_path / "grid" / "results.md", force=True, option="--out", owner="scenario_grid")  # its own
    check_new_file(tmp_path / "grid" / "profile.json", force=False, option="--out")  # not listed: the folder's
    os.mkfifo(tmp_path / "fifo")  # was: replaced by a regular file with --force
    with pytest.raises(OutputError, match="not a regular file"):
        check_new_file(tmp_path / "fifo", force=True, option="--out")
    assert (tmp_path / "grid" / "results.md").read_text() == "table"  # rerun then refuses it as foreign


def test_check_paths_sees_links(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("{}\n")
    link = tmp_path / "link.jsonl"
    os.link(src, link)
    with pytest.raises(OutputError, match="also an input"):
        check_paths([src], [("--output", link)])
    sym = tmp_path / "sym.jsonl"
    sym.symlink_to(src)
    with pytest.raises(OutputError, match="also an input"):
        check_paths([src], [("--output", sym)])


# ---- options and inputs: one line, exit 2 --------------------------------------------------------
@pytest.mark.parametrize("args, option", [
    (["--margin", "nan"], "--margin"), (["--margin", "-1"], "--margin"), (["--margin", "inf"], "--margin"),
    (["--threads", "100000"], "--threads"), (["--threads", "0"], "--threads"), (["--threads", "-1"], "--threads"),
    (["--chunk-rows", "0"], "--chunk-rows"), (["--batch-size", "0"], "--batch-size"),
    (["--reserve-quantile", "0"], "--reserve-quantile"), (["--reserve-quantile", "1.5"], "--reserve-quantile"),
    (["--reserve-quantile", "nan"], "--reserve-quantile"), (["--on-error", "ignore"], "--on-error"),
])
def test_annotate_options_are_checked_where_parsed(trace, tmp_path, args, option):
    res = run("annotate", trace, "-o", tmp_path / "o.jsonl", *args)
    assert res.exit_code == 2 and option in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "o.jsonl").exists()


def test_predict_and_train_options_are_checked(tmp_path):
    for args, option in ((["predict", "--margin", "nan", "hi"], "--margin"),
                         (["predict", "--threads", "100000", "hi"], "--threads"),
                         (["train", "--max-steps", "-1"], "--max-steps"), (["train", "--max-rows", "0"], "--max-rows"),
                         (["eval", "--model", "m", "--data", "d", "--reserve-quantile", "2"], "--reserve-quantile"),
                         (["export", "--model", "m", "--out", "o", "--parity-n", "0"], "--parity-n"),
                         # were accepted (the config's own seed has these bounds)
                         (["stack", "--model", "m", "-c", "c", "--data", "d", "--out", "o", "--seed", "-1"], "--seed"),
                         (["stack", "--model", "m", "-c", "c", "--data", "d", "--out", "o", "--threads", "100000"],
                          "--threads")):
        res = run(*args)
        assert res.exit_code == 2 and option in res.output, (args, res.output)
    cfg = tmp_path / "c.toml"
    cfg.write_text('max_steps = "four"\n')
    one_error_line(run("train", "-c", cfg, "--out", tmp_path / "m"), "c.toml: max_steps must be an integer")
    cfg.write_text("lr = nan\n")
    one_error_line(run("train", "-c", cfg, "--out", tmp_path / "m"), "lr must be a finite number")


def test_config_refuses_bad_values_naming_them():
    for d, msg in (({"max_steps": -1}, "max_steps must be in"), ({"batch_size": 0}, "batch_size"),
                   ({"input_mode": "all"}, "input_mode must be one of"), ({"test_frac": 1.0}, "test_frac"),
                   ({"include_generator": "yes"}, "true or false"), ({"threads": 0}, "threads"),
                   ({"seed": -1}, r"seed must be in \[0, 2\^32 - 1\]"), ({"split_seed": 2**32}, "split_seed")):
        with pytest.raises(ValueError, match=msg):
            TrainConfig.from_dict(d, "cfg.toml")


def test_one_bucket_of_training_data_is_refused():
    from rlpredict.samples import SAMPLE_FILES
    from rlpredict.train.trainer import prepare

    cfg = TrainConfig(data=[str(SAMPLE_FILES["sharegpt"])], buckets=[100_000, float("inf")])
    with pytest.raises(ValueError, match="one bucket"):
        prepare(cfg)


def test_corrupt_compressed_and_parquet_inputs_name_the_file(tmp_path):
    good = gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS * 200).encode())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(good[: len(good) // 2])
    one_error_line(run("annotate", cut, "-o", tmp_path / "o.jsonl.gz", "--no-progress"),
                   "cut.jsonl.gz: truncated or corrupt compressed file")
    assert not (tmp_path / "o.jsonl.gz").exists()
    chats = gzip.compress("".join(json.dumps({"prompt": "hi", "response": "hello"}) + "\n"
                                  for _ in range(2000)).encode())
    (tmp_path / "chats.jsonl.gz").write_bytes(chats[: len(chats) // 2])
    one_error_line(run("train", "--data", tmp_path / "chats.jsonl.gz", "--out", tmp_path / "m"),
                   "chats.jsonl.gz", "truncated or corrupt")
    pq = tmp_path / "bad.parquet"
    pq.write_bytes(b"PAR1" + os.urandom(200) + b"PAR1")
    one_error_line(run("annotate", pq, "-o", tmp_path / "o.parquet"), "bad.parquet")


def test_unknown_errors_are_one_line_and_debug_shows_the_traceback(trace, tmp_path, monkeypatch):
    from rlpredict.serve import runtime

    def boom(*a, **k):
        raise RuntimeError("unexpected")

    monkeypatch.setattr(runtime.Predictor, "load", boom)
    res = run("annotate", trace, "-o", tmp_path / "o.jsonl")
    assert res.exit_code == 1 and "internal error (a bug): RuntimeError: unexpected" in res.output
    res = run("--debug", "annotate", trace, "-o", tmp_path / "o.jsonl")
    assert isinstance(res.exception, RuntimeError)


def test_version():
    res = run("--version")
    assert res.exit_code == 0 and res.output.startswith("rlpredict 0.1.0 (bundle format rlpredict.bundle/1)")


@pytest.mark.parametrize(("sig", "start"), [("SIGTERM", "SIG_DFL"), ("SIGHUP", "SIG_DFL"), ("SIGHUP", "SIG_IGN")])
def test_sigterm_removes_temporary_files_like_ctrl_c(tmp_path, sig, start):
    """SIGTERM (kill, timeout) and SIGHUP (the terminal closed) end a run as Ctrl-C does; a
    signal ignored when the command starts (``nohup`` ignores SIGHUP) stays ignored."""
    script = textwrap.dedent(f"""
        import os, signal, typer
        signal.signal(signal.{sig}, signal.{start})  # as the shell that started the command left it
        from rlpredict.cli_boundary import BoundaryGroup
        from rlpredict.outputs import atomic_path
        app = typer.Typer(cls=BoundaryGroup)
        @app.command()
        def write():
            with atomic_path({str(tmp_path / "out.jsonl")!r}) as tmp:
                tmp.write_text("half")
                os.kill(os.getpid(), signal.{sig})
        @app.command()
        def other():
            pass
        app()
    """)
    res = subprocess.run([sys.executable, "-c", script, "write"], capture_output=True, text=True, cwd=REPO)
    if start == "SIG_IGN":
        assert res.returncode == 0 and (tmp_path / "out.jsonl").read_text() == "half", res.stderr
        return
    assert res.returncode == 130 and "interrupted" in res.stderr, res.stderr
    assert list(tmp_path.iterdir()) == []


# ---- bundle manifests are checked against their schema --------------------------------------------
BAD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**9), st.sampled_from(
    [float("nan"), float("inf"), -1.5, 0.0, 1e300]), st.text(max_size=5), st.lists(st.integers(-5, 5), max_size=3))
FIELDS = [("buckets", "edges", 1), ("buckets", "edges", -1), ("buckets", "point_tokens", 0),
          ("buckets", "reserve_tokens", 2), ("buckets", "reserve_quantile", None), ("buckets", "quantiles", 3),
          ("input", "max_length", None), ("input", "mode", None), ("input", "include_generator", None),
          ("tokenizer", "pad_token_id", None), ("model", "num_labels", None), ("model", "file", None),
          ("rl_tokenizer", None, None)]


@pytest.fixture(scope="module")
def bundle_copy(bundle_fp32, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("b") / "bundle"
    shutil.copytree(bundle_fp32, out)
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(FIELDS), value=BAD_VALUES)
def test_manifest_fuzz_loads_valid_or_names_the_field(bundle_copy, where, value):
    path = bundle_copy / "manifest.json"
    original = json.loads(path.read_text())
    m = json.loads(json.dumps(original))
    top, key, idx = where
    if key is None:
        m[top] = value
    elif idx is None:
        m[top][key] = value
    else:
        m[top][key][idx] = value
    path.write_text(json.dumps(m))
    try:
        b = load_bundle(bundle_copy, verify=False)
    except BundleError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)
    else:  # what loaded is sane
        s = b.buckets
        assert all(a < c for a, c in zip(s.edges, s.edges[1:], strict=False))
        assert min(s.reserve_tokens) >= 1 and 8 <= b.input.max_length <= 8192
    finally:
        path.write_text(json.dumps(original))


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["buckets"]["reserve_tokens"].__setitem__(0, -5), "reserve_tokens"),
    (lambda m: m["buckets"]["edges"].__setitem__(1, 10), "strictly increasing"),
    (lambda m: m["input"].__setitem__("max_length", 10**9), "max_length"),
    (lambda m: m["files"][next(iter(m["files"]))].__setitem__("sha256", "x"), "sha256"),
    (lambda m: m["input"].__setitem__("truncation_side", "middle"), "truncation_side"),
])
def test_manifest_named_cases(bundle_copy, edit, field):
    path = bundle_copy / "manifest.json"
    original = path.read_text()
    m = json.loads(original)
    edit(m)
    path.write_text(json.dumps(m))
    try:
        with pytest.raises(BundleError, match=field):
            load_bundle(bundle_copy, verify=False)
        one_error_line(run("predict", "--model", bundle_copy, "hi"), field)
    finally:
        path.write_text(original)


@pytest.mark.parametrize("key, value", [("inputs", ["foo", "bar"]), ("output", "nope")])
def test_manifest_model_io_must_match_the_onnx_file(bundle_copy, key, value):
    path = bundle_copy / "manifest.json"
    original = path.read_text()
    m = json.loads(original)
    m["model"][key] = value
    path.write_text(json.dumps(m))
    try:
        one_error_line(run("predict", "--model", bundle_copy, "hi"), f"model.{key}")
    finally:
        path.write_text(original)


# ---- fuzzing the options -------------------------------------------------------------------------
NUMBERS = st.one_of(st.integers(-10**12, 10**12).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.sampled_from(["nan", "-inf", "1e999", "", "abc", "1,2", "0x10", "1_000", " 3"]))
OPTIONS = ["--margin", "--reserve-quantile", "--threads", "--chunk-rows", "--batch-size"]


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opts=st.lists(st.tuples(st.sampled_from(OPTIONS), NUMBERS), min_size=1, max_size=3))
def test_annotate_option_fuzz(bundle_fp32, tmp_path, opts):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "out.jsonl"
    args = [a for pair in opts for a in pair]
    res = run("annotate", src, "-o", out, "-m", bundle_fp32, "--json", "--no-progress", "--force", *args)
    assert res.exit_code in (0, 2), res.output
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit))
    if res.exit_code == 0:
        assert _strict_json(res.stdout)["rows_out"] == len(ROWS)
        assert len(out.read_text().splitlines()) == len(ROWS)
    else:
        assert res.output.count("\n") <= 12 and not out.exists()  # one message (typer boxes usage errors)
    out.unlink(missing_ok=True)


# ---- found by an audit of bad inputs (December 2026) ---------------------------------------------
def _rehash(bundle: Path, name: str, data: bytes) -> None:
    """Replace a bundle file and its manifest entry, as a careless edit would (hash still valid)."""
    import hashlib

    (bundle / name).write_bytes(data)
    m = json.loads((bundle / "manifest.json").read_text())
    entry = m["files"][name]
    for k in entry:
        if "sha" in k:
            entry[k] = hashlib.sha256(data).hexdigest()
        elif k in ("bytes", "size"):
            entry[k] = len(data)
    (bundle / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("name, data, why", [("tokenizer.json", b'{"junk": 1}', "not a tokenizer file"),
                                             ("model.onnx", b"\x00" * 1000, "not a loadable ONNX model")])
def test_a_bundle_file_that_cannot_be_loaded_is_one_line(bundle_fp32, tmp_path, name, data, why):
    b = tmp_path / "b"
    shutil.copytree(bundle_fp32, b)
    _rehash(b, name, data)
    one_error_line(run("predict", "-m", b, "hello"), name, why)  # was: exit 1 and the library's error


def test_predict_reads_utf8_and_refuses_ignored_options(bundle_fp32):
    res = CliRunner().invoke(app, ["predict", "-m", str(bundle_fp32)], input=b"fine\nbad \xff here\n")
    one_error_line(res, "stdin: line 2: not valid UTF-8 (byte 4)")  # was: exit 1, a TypeError from the tokenizer
    for single, data in ((["--single"], b"\xef\xbb\xbfab\nc\xff"), ([], b"\xef\xbb\xbfab\xff\n")):
        res = CliRunner().invoke(app, ["predict", "-m", str(bundle_fp32), *single], input=data)  # (were: the
        one_error_line(res, "stdin: line 2: not valid UTF-8 (byte 1)" if single else  # byte and line counted
                       "stdin: line 1: not valid UTF-8 (byte 5)")  # from after a BOM)
    one_error_line(run("predict", "-m", bundle_fp32, "a\udcffb"), "prompt argument 1: not valid UTF-8")
    bom = CliRunner().invoke(app, ["predict", "-m", str(bundle_fp32), "--json"], input="\ufeffhello\n".encode())
    plain = CliRunner().invoke(app, ["predict", "-m", str(bundle_fp32), "--json"], input=b"hello\n")
    assert bom.exit_code == 0 and bom.stdout == plain.stdout  # a byte-order mark is not part of the prompt
    res = run("predict", "-m", bundle_fp32, "--generator", "\udcff\udcfe", "hello")  # was: exit 1, a TypeError
    assert res.exit_code == 2 and "--generator" in res.output and "Traceback" not in res.output
    res = run("predict", "-m", bundle_fp32, "--jsonl", "--single")
    assert res.exit_code == 2 and "--single" in res.output
    res = run("predict", "-m", bundle_fp32, "--jsonl", "hello")
    assert res.exit_code == 2 and "--jsonl" in res.output


def test_predict_numbers_prompts_by_their_stdin_line_and_counts_blank_lines(bundle_fp32):
    res = CliRunner().invoke(app, ["predict", "-m", str(bundle_fp32), "--json"], input=b"a\n\n  \nb\n\n")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["predictions"]
    assert [(r["line"], r["input"]) for r in rows] == [(1, "a"), (4, "b")]  # was: 0 and 1, blanks dropped unsaid
    assert "skipped 2 blank stdin line(s)" in res.stderr
    args = json.loads(run("predict", "-m", bundle_fp32, "--json", "x", "y").stdout)["predictions"]
    assert [r["argument"] for r in args] == [1, 2]
    one_error_line(CliRunner().invoke(app, ["predict", "-m", str(bundle_fp32)], input=b"\n \n"),
                   "stdin: no prompt")  # was: exit 0 and an empty table
    one_error_line(CliRunner().invoke(app, ["predict", "-m", str(bundle_fp32), "--single"], input=b" \n"),
                   "stdin: no prompt")  # was: a blank prompt predicted


def test_predict_refuses_a_blank_argument_and_names_bad_jsonl(bundle_fp32):
    one_error_line(run("predict", "-m", bundle_fp32, "ok", "  "), "prompt argument 2: empty")  # was: predicted
    one_error_line(run("predict", "-m", bundle_fp32, ""), "prompt argument 1: empty")
    deep = ('{"prompt": ' + "[" * 5000 + "]" * 5000 + "}\n").encode()
    res = CliRunner().invoke(app, ["predict", "-m", str(bundle_fp32), "--jsonl"], input=deep)
    one_error_line(res, "stdin: line 1: not valid JSON (nested too deeply)")  # was: exit 1, RecursionError
    res = CliRunner().invoke(app, ["predict", "-m", str(bundle_fp32), "--jsonl"], input=b'{"prompt": "a"}\n{"prompt": \n')
    one_error_line(res, "stdin: line 2: not valid JSON (")  # was: the decoder's bare message


@pytest.mark.parametrize(("name", "data", "why"), [
    ("empty.jsonl", b"", "the file is empty or holds only blank lines"),
    ("blank.jsonl", b"\n  \n", "the file is empty or holds only blank lines"),
    ("empty.jsonl.gz", b"", "the file is empty or holds only blank lines"),  # not even a gzip header
    ("header.csv", b"prompt,id\n", "holds a header and no row"),
    ("other_header.csv", b"x,y\n", "holds a header and no row"),
])
@pytest.mark.parametrize("mode", ["fail", "skip"])
def test_annotate_refuses_an_input_with_no_row(bundle_fp32, tmp_path, name, data, why, mode):
    """Every other command says "no rows"; annotate wrote an empty output and exited 0."""
    src = tmp_path / name
    src.write_bytes(data)
    out = tmp_path / f"out{''.join(src.suffixes)}"
    res = run("annotate", src, "-o", out, "-m", bundle_fp32, "--no-progress", "--on-error", mode)
    one_error_line(res, f"{src}: no rows to annotate", why)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no output, no rejects, no temporary file


def test_annotate_csv_names_an_empty_prompt_cell(bundle_fp32, tmp_path):
    src = tmp_path / "t.csv"
    src.write_text("id,prompt\n1,hello\n2,\n")
    res = run("annotate", src, "-o", tmp_path / "o.csv", "-m", bundle_fp32, "--no-progress")
    # was: "neither field 'prompt' nor 'messages' is present", with the column right there
    one_error_line(res, f"{src}: line 3: field 'prompt' is missing or null")


def test_annotate_a_file_that_names_its_prompt_otherwise(bundle_fp32, tmp_path):
    """Was: the error said "use --on-error skip", which wrote a header-only output, exit 0."""
    src = tmp_path / "t.csv"
    src.write_text("text,ts\nhello,1\nworld,2\n")
    res = run("annotate", src, "-o", tmp_path / "o.csv", "-m", bundle_fp32, "--no-progress")
    one_error_line(res, f"{src}: line 2: neither field 'prompt' nor 'messages' is present (the row has 'text', "
                        "'ts'); name the request's field with --prompt-field or --messages-field")
    res = run("annotate", src, "-o", tmp_path / "o.csv", "-m", bundle_fp32, "--no-progress", "--on-error", "skip")
    one_error_line(res, f"{src}: no row could be annotated: all 2 were rejected (2 x neither field 'prompt' nor "
                        "'messages' is present); nothing was written; name the request's field with --prompt-field")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]
    res = run("annotate", src, "-o", tmp_path / "o.csv", "-m", bundle_fp32, "--no-progress", "--prompt-field", "text")
    assert res.exit_code == 0, res.output
    # a field named with a dot is one top-level key here: given twice, which is meant?
    dotted = tmp_path / "d.jsonl"
    dotted.write_text('{"req.text": "a", "req.text": "b"}\n')
    res = run("annotate", dotted, "-o", tmp_path / "d.out.jsonl", "-m", bundle_fp32, "--no-progress",
              "--prompt-field", "req.text")
    one_error_line(res, f"{dotted}: line 1: key 'req.text' is given twice in one JSON object")


def test_annotate_rejects_keep_bytes_that_are_not_utf8(bundle_fp32, tmp_path):
    src = tmp_path / "t.jsonl"
    src.write_bytes(b'{"prompt": "ok"}\n\xff\xfe{"prompt": "caf\xe9"}\n')
    res = run("annotate", src, "-o", tmp_path / "o.jsonl", "-m", bundle_fp32, "--no-progress", "--on-error", "skip")
    assert res.exit_code == 0, res.output
    (row,) = [json.loads(x) for x in (tmp_path / "o.rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert row["row"].encode("utf-8", "surrogateescape") == b'\xff\xfe{"prompt": "caf\xe9"}'  # was: U+FFFD


@pytest.mark.parametrize("args", [["rlpredict", "--help"], ["rlpredict", "predict", "--json", "hello"],
                                  ["ecoserve", "policies"], ["ecoserve", "capacity", "--help"]])
def test_a_reader_that_leaves_stops_the_cli_quietly(args, bundle_fp32):
    """``cmd | head``: exit 141 and nothing on stderr, as a shell tool (was: exit 1 without a
    word, or exit 2 and "error: [Errno 32] Broken pipe")."""
    module = {"rlpredict": "rlpredict.cli", "ecoserve": "ecoserve_sched.cli"}[args[0]]
    extra = ["-m", str(bundle_fp32)] if args[1] == "predict" else []
    proc = subprocess.Popen([sys.executable, "-c", f"from {module} import main; main()", *args[1:], *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    proc.stdout.close()  # the reader is gone before the first write
    err = proc.stderr.read()
    assert (proc.wait(timeout=120), err) == (141, b"")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("args", [["rlpredict", "--version"], ["rlpredict", "--help"], ["ecoserve", "policies"],
                                  ["rlpredict", "predict", "--json", "hello"]])
def test_a_full_disk_behind_stdout_is_one_line_naming_it(args, bundle_fp32):
    """``cmd > file`` on a full disk: one line naming standard output, exit 2 (was: rich's
    traceback for --help and --version, "error: [Errno 28] No space left on device" else)."""
    module = {"rlpredict": "rlpredict.cli", "ecoserve": "ecoserve_sched.cli"}[args[0]]
    extra = ["-m", str(bundle_fp32)] if args[1] == "predict" else []
    with open("/dev/full", "w") as full:
        res = subprocess.run([sys.executable, "-c", f"from {module} import main; main()", *args[1:], *extra],
                             stdout=full, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=120,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2 and res.stderr.splitlines()[-1] == "error: standard output: No space left on device"
    assert "Traceback" not in res.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_behind_stderr_does_not_stop_the_work(tmp_path):
    """``cmd 2> log`` on a full disk: notes and progress lines are lost, the results are not
    (was: the first note's ENOSPC ended ``simulate`` with exit 1, nothing on stdout, and
    ``compare`` with no folder written); a bad input still exits 2."""
    trace = REPO / "ecoserve_sched" / "samples" / "azure_conv_sharegpt.jsonl.gz"
    cli = [sys.executable, "-c", "from ecoserve_sched.cli import main; main()"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open("/dev/full", "w") as full:
        sim = subprocess.run([*cli, "simulate", "--trace", str(trace), "--policy", "vllm", "--max-requests", "50",
                              "--json"], stdout=subprocess.PIPE, stderr=full, text=True, cwd=tmp_path, timeout=120,
                             env=env)
        comp = subprocess.run([*cli, "compare", "--trace", str(trace), "--policies", "vllm", "--rate-scales", "1",
                               "--max-requests", "50", "--out", "c1"], stdout=subprocess.DEVNULL, stderr=full,
                              cwd=tmp_path, timeout=120, env=env)
        bad = subprocess.run([*cli, "simulate", "--trace", "nope.csv"], stdout=subprocess.DEVNULL, stderr=full,
                             cwd=tmp_path, timeout=120, env=env)
    assert sim.returncode == 0 and json.loads(sim.stdout)["requests"] == 50
    assert comp.returncode == 0 and (tmp_path / "c1" / "results.json").is_file()
    assert bad.returncode == 2


def test_a_signal_after_a_successful_command_is_ignored():
    """Once a command succeeded, a Ctrl-C or SIGTERM during the interpreter's teardown leaves
    exit 0 (was: 130 with no message after a complete train, eval or export)."""
    code = ("import atexit, os, signal, typer\n"
            "from rlpredict.cli_boundary import BoundaryGroup, run_cli\n"
            "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), os.kill(os.getpid(), signal.SIGINT)))\n"
            "app = typer.Typer(cls=BoundaryGroup)\n"
            "@app.command()\n"
            "def hi() -> None:\n"
            "    print('done')\n"
            "@app.command()\n"
            "def other() -> None:\n"
            "    pass\n"
            "run_cli(app)\n")  # the signals come in teardown, after the run's own atexit
    res = subprocess.run([sys.executable, "-c", code, "hi"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert (res.returncode, res.stdout) == (0, "done\n"), res.stderr


def test_predict_with_stdin_closed_asks_for_prompts(bundle_fp32):
    """Was: "internal error (a bug): AttributeError: 'NoneType' object has no attribute 'isatty'"."""
    res = subprocess.run([sys.executable, "-c", "from rlpredict.cli import main; main()", "predict", "-m",
                          str(bundle_fp32)], stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=REPO,
                         timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"}, preexec_fn=lambda: os.close(0))
    assert res.returncode == 2 and "error: give TEXT arguments or pipe prompts on stdin" in res.stderr


def test_a_full_disk_names_the_file_being_written(tmp_path):
    """Was: "error: [Errno 28] No space left on device", no file named."""
    import errno

    from rlpredict.outputs import atomic_path

    with pytest.raises(OSError, match=r"No space left on device: '.*out\.jsonl'") as e, \
            atomic_path(tmp_path / "out.jsonl"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert e.value.filename == str(tmp_path / "out.jsonl") and list(tmp_path.iterdir()) == []


def test_a_full_disk_names_the_folder_being_written(tmp_path):
    """A folder output (``ecoserve compare --out``, ``eval``, ``stack``...) on a full disk: was
    "error: [Errno 28] No space left on device", no folder named (a reviewer's tmpfs of 4 KiB)."""
    import errno

    from rlpredict.outputs import output_dir

    with pytest.raises(OSError, match=r"No space left on device: '.*report'") as e, \
            output_dir(tmp_path / "report", force=False, tool="test"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert e.value.filename == str(tmp_path / "report") and list(tmp_path.iterdir()) == []
    # shutil's copy names its source: a reviewer's full disk under `rlpredict calibrate` was
    # blamed on the shipped bundle copied from; other errors keep the file they name
    with pytest.raises(OSError) as e, output_dir(tmp_path / "cal", force=False, tool="test"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "models/bundle/lexical.npz")
    assert e.value.filename == str(tmp_path / "cal")
    with pytest.raises(OSError) as e, output_dir(tmp_path / "cal", force=False, tool="test"):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), "models/bundle/lexical.npz")
    assert e.value.filename == "models/bundle/lexical.npz" and list(tmp_path.iterdir()) == []


def test_load_trained_names_the_folder(tiny_model_dir, tmp_path):
    from rlpredict.train.model_meta import ModelLoadError, load_trained

    bad = tmp_path / "m"
    shutil.copytree(tiny_model_dir, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=rf"{bad}: cannot load the trained model \(SafetensorError"):
        load_trained(bad)


@pytest.mark.parametrize(("name", "text", "result"), [
    ("dup.yaml", "max_steps: 1\nmax_steps: 2\n", r"dup\.yaml: line 2: key 'max_steps' is given twice"),  # was: 2
    ("bom.toml", "\ufeffmax_steps = 3\n", 3),  # was: "Invalid statement (at line 1, column 1)"
    ("c.json", '{"max_steps": 4}', 4),  # was: read as TOML, "Invalid statement"
    ("d.json", '{"max_steps": 4, "max_steps": 5}', r"d\.json: key 'max_steps' is given twice"),
    ("uh.yaml", "? [a, b]\n: 1\n", r"uh\.yaml: not valid YAML"),  # an unhashable key: yaml's own error
])
def test_a_recipe_in_yaml_toml_or_json_refuses_a_key_given_twice(tmp_path, name, text, result):
    cfg = tmp_path / name
    cfg.write_text(text, encoding="utf-8")
    if isinstance(result, int):
        assert TrainConfig.load(cfg).max_steps == result
    else:
        with pytest.raises(ValueError, match=result):
            TrainConfig.load(cfg)


@pytest.mark.parametrize(("data", "msg"), [("5", "data must be a list, got 5"),
                                           ("[5]", "data items: must be a string, got \\[5\\]"),
                                           ('[""]', "data items: must not be empty")])  # was: the config's folder
def test_a_config_whose_data_is_not_paths_is_named(tmp_path, data, msg):
    """Was: a TypeError, reported as a bug."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"data = {data}\n")
    with pytest.raises(ValueError, match=rf"c\.toml: {msg}"):
        TrainConfig.load(cfg)


@pytest.mark.parametrize(("text", "why"), [
    # were refused only once the data was read, naming neither the file nor the field
    ("buckets = [100.0, 50.0, inf]", "buckets: .*strictly increasing"),
    ('buckets = "quantile:1"', r"buckets: 'quantile:1': N must be a whole number in \[2, 1024\]"),
    ('buckets = "log:x"', r"buckets: 'log:x': N must be a whole number in \[2, 1024\]"),
    ('buckets = "log:1000000000000"', r"buckets: 'log:1000000000000': N must be"),  # was: "out of memory"
    # as --data (was: every row trained twice)
    ('data = ["a.jsonl", "./a.jsonl"]', r"data: .*a.jsonl is given twice"),
    ('buckets = "nope"', "buckets: unknown bucket spec"),
    # were: an IndexError in training, and "reserve_tokens must be integers" for an edge of 0.5
    ("buckets = [32, 64]", r"buckets: the last edge must be inf"),
    ("buckets = [0.5, inf]", r"buckets: edges are token counts: whole numbers >= 1 \(and inf last\), got 0.5"),
    ("buckets = [32, inf, inf]", r"buckets: edges are token counts: whole numbers >= 1 \(and inf last\), got inf"),
    ('encoder = " "', "encoder: empty"),
    # was: tau "0" at every evaluation and the checkpoint picked on it (a reviewer's recipe)
    ('best_metric = "kendall_tau"\neval_rows = 1', "eval_rows 1: best_metric kendall_tau needs at least 2"),
    # were ignored: ``max_steps = 0`` above ``[train]`` trained with the default
    ("max_steps = 0\n[train]\nmax_steps = 2", r"'max_steps' outside the \[train\] table would be ignored"),
    ("train = 5", "train: expected a table"),
])
def test_a_config_is_checked_before_the_data_is_read(tmp_path, text, why):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text + "\n")
    with pytest.raises(ValueError, match=rf"c\.toml: {why}"):
        TrainConfig.load(cfg)
    cfg.write_text("[train]\nmax_steps = 2\n")
    assert TrainConfig.load(cfg).max_steps == 2


def test_kendall_tau_as_best_metric_is_refused_on_a_one_row_held_out_side(tmp_path):
    """The config's check, on the held-out rows there are (was: ``eval_rows`` was checked alone,
    so a split leaving one row picked checkpoints and stopped early on a tau of "0")."""
    from rlpredict.buckets import BucketScheme
    from rlpredict.data import LoadReport, Sample
    from rlpredict.train.trainer import Prepared, train

    def row(i: int) -> Sample:
        return Sample(str(i), str(i), [{"role": "user", "content": f"p{i}"}], "r", 10 + 90 * (i % 2), "s", None, "x")

    prep = Prepared([row(i) for i in range(8)], [row(9)], BucketScheme.from_edges([50, float("inf")]),
                    LoadReport())
    cfg = TrainConfig(data=["d.jsonl"], best_metric="kendall_tau", max_steps=1)
    with pytest.raises(ValueError, match=r"^d\.jsonl: the held-out side has 1 row: best_metric kendall_tau needs"):
        train(cfg, tmp_path / "m", prepared=prep)
    assert not (tmp_path / "m").exists() and not (tmp_path / "m-checkpoints").exists()


def test_a_config_reads_its_paths_and_on_error_as_written(tmp_path, monkeypatch):
    """A tokenizer.json path is relative to the config, as data and encoder are (was: to the
    working directory); a config's on_error holds unless --on-error is given (was: always
    "fail"); a config that is not UTF-8 is named (was: the codec's message alone)."""
    (tmp_path / "cfgs" / "tok").mkdir(parents=True)
    cfg = tmp_path / "cfgs" / "c.toml"
    cfg.write_text('rl_tokenizer = "tok/tokenizer.json"\non_error = "skip"\n')
    monkeypatch.chdir(tmp_path)
    loaded = TrainConfig.load(cfg)
    assert Path(loaded.rl_tokenizer) == tmp_path / "cfgs" / "tok" / "tokenizer.json"
    assert loaded.on_error == "skip"
    assert TrainConfig.load(_write(cfg, 'rl_tokenizer = "llama3"\n')).rl_tokenizer == "llama3"  # a name stays
    cfg.write_bytes(b'data = ["\xff"]\n')
    with pytest.raises(ValueError, match=r"c\.toml: line 1: not UTF-8 text \(byte 9\)"):
        TrainConfig.load(cfg)
    # the CLI keeps the config's on_error unless --on-error is given
    seen = []

    def prepare(cfg):
        seen.append(cfg.on_error)
        raise ValueError("stop here")

    monkeypatch.setattr("rlpredict.train.trainer.prepare", prepare)
    cfg.write_text('data = ["rows.jsonl"]\non_error = "skip"\n')
    (tmp_path / "cfgs" / "rows.jsonl").write_text("{}\n")
    for flags in ([], ["--on-error", "fail"]):
        res = CliRunner().invoke(app, ["train", "-c", str(cfg), "--out", str(tmp_path / "m"), *flags])
        assert res.exit_code == 2 and "stop here" in res.output, res.output
    assert seen == ["skip", "fail"]


def test_train_says_how_many_samples_include_generator_trains_without_one(tmp_path, monkeypatch):
    """Was: every row without a generator trained as 'model: unknown', without a word."""
    def stop(*args, **kwargs):
        raise ValueError("stop here")

    monkeypatch.setattr("rlpredict.train.trainer.train", stop)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}", "response": "word " * (i * 7 % 50 + 1),
                                        **({"model": "m"} if i % 4 == 0 else {})}) + "\n" for i in range(40)))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data = ["{data}"]\ninclude_generator = true\nbuckets = [8, 32, inf]\ntest_frac = 0.2\n')
    res = CliRunner().invoke(app, ["train", "-c", str(cfg), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "stop here" in res.output, res.output
    assert "training samples name no generator" in " ".join(res.output.split())


def _write(path, text):
    path.write_text(text)
    return path


def test_a_bad_yaml_config_is_named(tmp_path):
    pytest.importorskip("yaml")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("a: [1\n")
    with pytest.raises(ValueError, match=r"c\.yaml: not valid YAML"):
        TrainConfig.load(cfg)
    cfg.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"c\.yaml: expected a mapping"):
        TrainConfig.load(cfg)


def test_annotate_counts_rows_a_generator_bundle_predicts_without_one(tmp_path):
    """The shipped bundle takes the generator: rows without one (a typo in --generator-field,
    say) are counted and said, not predicted as "model: unknown" silently."""
    from rlpredict.serve.bundle import default_bundle_path

    src = tmp_path / "in.jsonl"
    # blank space names no model (was: taken as one's name); the next field is read then
    src.write_text('{"prompt": "a", "generator": "gpt-4"}\n{"prompt": "b"}\n{"prompt": "c", "generator": " \\t"}\n'
                   '{"prompt": "d", "generator": "  ", "model": "gpt-4"}\n')
    for extra, without in (([], 2), (["--generator-field", "modle"], 4)):
        res = run("annotate", src, "-o", tmp_path / "o.jsonl", "-m", default_bundle_path(), "--force", *extra)
        assert res.exit_code == 0, res.output
        assert f"{without} row(s) have no generator" in " ".join(res.output.split())
    # a request with no user text: predicted as an empty prompt, and counted (was: silently)
    src.write_text('{"messages": [{"role": "system", "content": "Write an essay"}], "generator": "g"}\n'
                   '{"prompt": "", "generator": "g"}\n{"prompt": "b", "generator": "g"}\n')
    res = run("annotate", src, "-o", tmp_path / "o.jsonl", "-m", default_bundle_path(), "--force")
    assert res.exit_code == 0 and "2 row(s) have no text where this bundle reads it" in " ".join(res.output.split())
    # a request field given twice is a bad row (was: the last kept; ecoserve refused the output)
    src.write_text('{"prompt": "a long essay", "prompt": "hi"}\n')
    res = run("annotate", src, "-o", tmp_path / "o.jsonl", "-m", default_bundle_path(), "--force")
    assert res.exit_code == 2 and "key 'prompt' is given twice" in res.output


def test_annotate_never_writes_inside_the_bundle_it_reads(bundle_fp32, tmp_path):
    """Was: written there (a reviewer's `annotate held.jsonl -o b6/x.jsonl -m b6`), where
    calibrate and export refuse an output inside their input."""
    bundle = tmp_path / "b"
    shutil.copytree(bundle_fp32, bundle)
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "a"}\n')
    one_error_line(run("annotate", src, "-o", bundle / "x.jsonl", "-m", bundle), "lies inside the input")
    assert not (bundle / "x.jsonl").exists()


def test_annotate_reads_the_generator_where_training_reads_it(tmp_path):
    """``generator``, else ``model`` (training's ``GENERATOR_FIELDS``): was ``generator`` alone,
    so a log naming its model in ``model``, trained with it, was annotated as "model: unknown"."""
    from rlpredict.serve.bundle import default_bundle_path
    from rlpredict.serve.runtime import Predictor

    prompt = "Write a detailed essay on the history of the Roman empire"
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": prompt, "model": "gpt4_1106_preview"}) + "\n")
    res = run("annotate", src, "-o", tmp_path / "o.jsonl", "-m", default_bundle_path())
    assert res.exit_code == 0 and "have no generator" not in res.output, res.output
    want = Predictor.load().predict([prompt], ["gpt4_1106_preview"])[0]
    row = json.loads((tmp_path / "o.jsonl").read_text())
    assert (row["rl_bucket"], row["rl_pred_tokens"]) == (want.bucket, want.pred_tokens)
    res = run("annotate", src, "-o", tmp_path / "g.jsonl", "-m", default_bundle_path(), "--generator-field", "generator")
    assert "1 row(s) have no generator (field 'generator')" in " ".join(res.output.split())


def test_a_parquet_file_with_a_column_twice_is_refused(bundle_fp32, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    src = tmp_path / "dup.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["prompt", "prompt"]), src)
    one_error_line(run("annotate", src, "-o", tmp_path / "o.parquet", "-m", bundle_fp32),  # was: exit 1, KeyError
                   "dup.parquet", "column(s) prompt appear more than once")


def test_annotate_reports_replaced_columns_and_refuses_what_it_would_ignore(bundle_fp32, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "a", "rl_bucket": "OLD"}\n{"prompt": "b"}\n')
    out = tmp_path / "out.jsonl"
    res = run("annotate", src, "-o", out, "-m", bundle_fp32, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["rows_replaced"] == 1
    one_error_line(run("annotate", src, "-o", out, "-m", bundle_fp32, "--force", "--prompt-field", "rl_bucket"),
                   "--prompt-field")
    one_error_line(run("annotate", src, "-o", out, "-m", bundle_fp32, "--force", "--rejects", tmp_path / "r.jsonl"),
                   "--rejects")
    # a row with rl_* fields gets their new values in place, every other byte as it was (a rewrite
    # through json.dumps lost "x": 1, turned 1e-400 into 0.0 and cut long decimals)
    rows = ['{"prompt": "a", "x": 1, "x": 2, "rl_bucket": 3}', '{"prompt":"b","big":1e400,"rl_bucket" : 1 ,"t":1e-400}',
            '{"prompt": "c", "rl_bucket": 1, "d": 0.12345678901234567890123, "rl_bucket": 2, "o": {"rl_bucket": 5}}  ',
            '{"prompt": "d", "x": NaN, "rl_q90_tokens": 7}']
    src.write_text("".join(r + "\n" for r in rows))
    res = run("annotate", src, "-o", out, "-m", bundle_fp32, "--force", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert (summary["rows_out"], summary["rows_replaced"], summary["stale_fields"]) == (4, 3, {"rl_q90_tokens": 1})
    got = out.read_text().splitlines()
    (b0, p0, r0), (b1, p1, r1), (b2, p2, r2), _ = ((r["rl_bucket"], r["rl_pred_tokens"], r["rl_reserve_tokens"])
                                                   for r in map(json.loads, got))
    assert got[0] == f'{{"prompt": "a", "x": 1, "x": 2, "rl_bucket": {b0}, "rl_pred_tokens": {p0}, "rl_reserve_tokens": {r0}}}'
    assert got[1] == (f'{{"prompt":"b","big":1e400,"rl_bucket" : {b1} ,"t":1e-400, "rl_pred_tokens": {p1}, '
                      f'"rl_reserve_tokens": {r1}}}')
    assert got[2] == (f'{{"prompt": "c", "rl_bucket": {b2}, "d": 0.12345678901234567890123, "rl_bucket": {b2}, '
                      f'"o": {{"rl_bucket": 5}}, "rl_pred_tokens": {p2}, "rl_reserve_tokens": {r2}}}  ')  # (the
    # blanks after the brace were dropped)
    assert got[3].startswith('{"prompt": "d", "x": NaN, "rl_q90_tokens": 7, "rl_bucket": ')  # kept, and said:
    res = run("annotate", src, "-o", out, "-m", bundle_fp32, "--force")
    assert "1 row(s) keep rl_q90_tokens from an earlier annotation" in res.stderr
    stale = tmp_path / "q.csv"
    stale.write_text("prompt,rl_q90_tokens\na,7\nb,8\n")
    res = run("annotate", stale, "-o", tmp_path / "q.out.csv", "-m", bundle_fp32, "--json")
    assert json.loads(res.stdout)["stale_fields"] == {"rl_q90_tokens": 2}
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "x.parquet")  # was: "(the row is empty)"
    one_error_line(run("annotate", tmp_path / "x.parquet", "-o", tmp_path / "x.out.parquet", "-m", bundle_fp32),
                   "row 1: neither field 'prompt' nor 'messages' is present (the row has 'x')")
    pq.write_table(pa.table({"prompt": ["a", "b"], "rl_q90_tokens": [7, 8]}), tmp_path / "q.parquet")
    res = run("annotate", tmp_path / "q.parquet", "-o", tmp_path / "q.out.parquet", "-m", bundle_fp32, "--json")
    assert json.loads(res.stdout)["stale_fields"] == {"rl_q90_tokens": 2}
    crlf = tmp_path / "crlf.jsonl"  # each line keeps its ending (was: CRLF written as LF)
    crlf.write_bytes(b'{"prompt": "a"}\r\n{"prompt": "b"}\n')
    assert run("annotate", crlf, "-o", tmp_path / "crlf.out.jsonl", "-m", bundle_fp32).exit_code == 0
    first, second = (tmp_path / "crlf.out.jsonl").read_bytes().splitlines(keepends=True)
    assert first.endswith(b"}\r\n") and second.endswith(b"}\n") and not second.endswith(b"\r\n")
    many = tmp_path / "many.jsonl"  # each row its own stale name: bounded (was: 20,000 names, a line each)
    many.write_text("".join(json.dumps({"prompt": "p", f"rl_q{i % 60 + 1}_tokens": 5}) + "\n" for i in range(120)))
    res = run("annotate", many, "-o", tmp_path / "many.out.jsonl", "-m", bundle_fp32, "--json")
    fields = json.loads(res.stdout)["stale_fields"]
    assert len(fields) == 33 and fields["other rl_qN_tokens fields"] == 120 - 2 * 32 and sum(fields.values()) == 120
    for name, text in (("dup.csv", "prompt,rl_bucket,rl_bucket\na,1,9\n"), ("dup2.csv", "prompt,prompt\na,b\n")):
        (tmp_path / name).write_text(text)  # was: one of the two read, silently
        one_error_line(run("annotate", tmp_path / name, "-o", tmp_path / "o.csv", "-m", bundle_fp32),
                       name, "appear more than once in the header")
    cut = tmp_path / "cut.csv"  # a quote left open swallows every later row: refused at its line
    cut.write_text('id,prompt\n1,a\n2,"cut short\n3,c\n')
    one_error_line(run("annotate", cut, "-o", tmp_path / "o.csv", "-m", bundle_fp32), "line 3: malformed CSV")


def test_calibrate_keeps_the_recorded_split():
    from rlpredict.serve.calibrate import held_out

    manifest = {"evaluation": {"split": {"test_frac": 0.1, "seed": 0}}}
    with pytest.raises(ValueError, match=r"--test-frac 0\.5 differs from the split the bundle recorded"):
        held_out([], manifest, "test", 0.5, None)
    with pytest.raises(ValueError, match="--seed 3 differs"):
        held_out([], manifest, "test", None, 3)
    with pytest.raises(ValueError, match="--split all uses every row"):
        held_out([], manifest, "all", 0.5, None)
    assert held_out([], manifest, "test", 0.1, 0)[1].endswith("(test_frac 0.1, seed 0, rule id)")


def _labelled(tmp_path: Path) -> Path:
    """40 labelled rows in 40 conversations."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "a " * (i + 1), "conversation_id": i}) + "\n"
                            for i in range(40)))
    return data


@pytest.mark.parametrize("name, content, needle", [
    ("training_summary.json", "[]", "data.split"),  # was: exit 1, TypeError
    ("training_summary.json", '{"data": {"split": {"test_frac": "x"}}}', "data.split.test_frac"),
    ("training_summary.json", "{oops", "line 1: not valid JSON"),  # was: no file named
    ("rlpredict.json", "[]", "expected a JSON object"),  # was: exit 1, AttributeError
    ("rlpredict.json", '{"format": "rlpredict.model/1", "buckets": "x"}', "field 'buckets' must be an object"),
])
def test_a_model_folders_own_files_are_checked(tiny_model_dir, tmp_path, name, content, needle):
    data = _labelled(tmp_path)
    bad = tmp_path / "m"
    shutil.copytree(tiny_model_dir, bad)
    (bad / name).write_text(content)
    one_error_line(run("eval", "--model", bad, "--data", data, "--out", tmp_path / "e"), name, needle)
    if name == "rlpredict.json":
        one_error_line(run("export", "--model", bad, "--out", tmp_path / "b"), name, needle)


def test_a_missing_model_folder_is_said_to_be_missing(tmp_path):
    one_error_line(run("export", "--model", tmp_path / "nope", "--out", tmp_path / "b"),
                   "nope: no such folder")  # was: "no rlpredict.json; is this a model ..."


def test_eval_given_a_bundle_says_it_takes_a_trained_model(bundle_fp32, tmp_path):
    one_error_line(run("eval", "--model", bundle_fp32, "--data", _labelled(tmp_path), "--out", tmp_path / "e"),
                   "an exported bundle, not a model folder written by `rlpredict train`")
    (tmp_path / "m.json").write_text("{}")  # was: "--out's parent ... is a file" (the default --out)
    one_error_line(run("eval", "--model", tmp_path / "m.json", "--data", _labelled(tmp_path)), "m.json: not a folder")


def test_the_same_data_twice_is_refused(tiny_model_dir, tmp_path):
    data = _labelled(tmp_path)  # was: its rows counted twice
    res = run("eval", "--model", tiny_model_dir, "--data", data, "--data", tmp_path / "." / "d.jsonl",
              "--out", tmp_path / "e")
    assert res.exit_code == 2 and "given twice" in res.output and "Traceback" not in res.output
    res = run("eval", "--model", tiny_model_dir, "--data", data, "--data", tmp_path, "--out", tmp_path / "e")
    assert res.exit_code == 2 and "inside" in res.output and "Traceback" not in res.output  # was: read twice
    os.link(data, tmp_path / "hard.jsonl")  # was: read twice (drift, stack, eval)
    res = run("eval", "--model", tiny_model_dir, "--data", data, "--data", tmp_path / "hard.jsonl",
              "--out", tmp_path / "e")
    one_error_line(res, "the same file as", "hard")
    res = run("eval", "--model", tiny_model_dir, "--data", data, "--baselines", "constant,constant",
              "--out", tmp_path / "e")  # was: run twice
    assert res.exit_code == 2 and "listed twice" in res.output and "Traceback" not in res.output


def test_eval_reads_a_summary_without_a_split_record(tiny_model_dir, tmp_path):
    """``training_summary.json`` without ``data.split`` (the test fixture's): the default split."""
    data = _labelled(tmp_path)
    res = run("eval", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "e")  # was: exit 1, KeyError
    assert res.exit_code == 0, res.output
    res = run("eval", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "e5",
              "--reserve-quantile", "0.5")  # was: exit 1, KeyError 'coverage_q90' (any level but 0.9)
    assert res.exit_code == 0, res.output
    assert "cover q50" in (tmp_path / "e5" / "report.md").read_text()


def test_eval_refuses_baseline_data_it_would_ignore(tiny_model_dir, trace, tmp_path):
    one_error_line(run("eval", "--model", tiny_model_dir, "--data", trace, "--baseline-data", trace,
                       "--out", tmp_path / "e"), "--baseline-data")
    # with --split all, baselines trained on the rows they are scored on (was: accepted)
    res = run("eval", "--model", tiny_model_dir, "--data", trace, "--split", "all", "--baseline-data",
              trace.parent, "--out", tmp_path / "e")
    one_error_line(res, "--baseline-data")
    assert "overlaps" in res.output and not (tmp_path / "e").exists()


def test_eval_baselines_are_not_scored_on_their_own_training_rows(tiny_model_dir, tmp_path):
    """Audit of eval, finding 1: a hard link or a copy of --data as --baseline-data was accepted
    (the baselines then scored on the rows they trained on, and the verdict said the model
    lost)."""
    data = _labelled(tmp_path)
    base = ["eval", "--model", tiny_model_dir, "--data", data, "--split", "all", "--out", tmp_path / "e"]
    os.link(data, tmp_path / "hard.jsonl")
    one_error_line(run(*base, "--baseline-data", tmp_path / "hard.jsonl"), "overlaps --data")
    copy = tmp_path / "copy" / "d.jsonl"
    copy.parent.mkdir()
    shutil.copy(data, copy)
    one_error_line(run(*base, "--baseline-data", copy), f"{copy}: every one of the 40 scored samples")
    assert not (tmp_path / "e").exists()
    part = tmp_path / "part.jsonl"  # 10 of the scored rows, and 19 others
    part.write_text("".join(data.read_text().splitlines(keepends=True)[:10])
                    + "".join(json.dumps({"prompt": f"other {i}", "response": "b " * i}) + "\n" for i in range(1, 20)))
    res = run(*base, "--baseline-data", part, "--baselines", "constant")
    assert res.exit_code == 0, res.output
    assert "10 of the 40 scored samples are also --baseline-data samples" in res.stderr
    assert json.loads((tmp_path / "e" / "report.json").read_text())["baseline_train_overlap"] == 10
    assert "**10 scored samples are also --baseline-data samples**" in (tmp_path / "e" / "report.md").read_text()


def test_eval_never_writes_its_report_into_its_data(tiny_model_dir, tmp_path):
    """Finding 2: the report landed in the --data folder, and the next run read it as data."""
    d = tmp_path / "dd"
    d.mkdir()
    shutil.copy(_labelled(tmp_path), d / "d.jsonl")
    one_error_line(run("eval", "--model", tiny_model_dir, "--data", d, "--split", "all", "--baselines", "",
                       "--out", d / "eval"), f"{d / 'eval'}: --out lies inside the input {d}")
    assert sorted(p.name for p in d.iterdir()) == ["d.jsonl"]


@pytest.mark.parametrize("tool", ["rlpredict train", "ecoserve demo"])
def test_eval_never_replaces_another_tools_folder(tiny_model_dir, tmp_path, tool):
    """Finding 3: ``eval --force`` replaced a trained model (90 MB of weights) or an ``ecoserve
    demo`` run with a report, and the refusal without --force did not say whose it was."""
    data = _labelled(tmp_path)
    base = ["eval", "--model", tiny_model_dir, "--data", data, "--split", "all", "--baselines", ""]
    other = tmp_path / "other"
    with output_dir(other, force=False, tool=tool) as tmp:
        (tmp / "model.safetensors").write_text("weights")
    before = snapshot(other)
    for force in ((), ("--force",)):
        one_error_line(run(*base, "--out", other, *force), f"--out is {tool}'s output folder, not rlpredict eval's")
    assert snapshot(other) == before
    mine = tmp_path / "e"  # its own report: replaced with --force only
    assert run(*base, "--out", mine).exit_code == 0
    one_error_line(run(*base, "--out", mine), "exists; pass --force to replace it (--out; it is rlpredict eval's output)")
    assert run(*base, "--out", mine, "--force").exit_code == 0


def test_eval_refuses_blank_paths(tiny_model_dir, tmp_path, monkeypatch):
    """Finding 5: ``--data ""`` (an unset variable) read the whole current folder."""
    data = _labelled(tmp_path)
    monkeypatch.chdir(tmp_path)
    out = ("--out", tmp_path / "e")
    one_error_line(run("eval", "--model", tiny_model_dir, "--data", "", *out), "--data", "empty")
    one_error_line(run("eval", "--model", "", "--data", data, *out), "--model", "empty")
    one_error_line(run("eval", "--model", tiny_model_dir, "--data", data, "--split", "all", "--baseline-data", " ",
                       *out), "--baseline-data", "empty")
    assert not (tmp_path / "e").exists()


def test_eval_split_all_says_it_scores_training_rows(tiny_model_dir, tmp_path):
    """Finding 6: ``--split all`` over the model's own training files printed the unused split
    settings and said nothing of training rows."""
    data = _labelled(tmp_path)
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    (model / "training_summary.json").write_text(json.dumps(
        {"config": {"data": [str(data)]}, "data": {"split": {"test_frac": 0.25, "seed": 3}}}))
    res = run("eval", "--model", model, "--data", data, "--split", "all", "--baselines", "", "--out", tmp_path / "e")
    assert res.exit_code == 0, res.output
    assert f"--split all scores the model on data it trained on ({data}" in res.stderr
    split = json.loads((tmp_path / "e" / "report.json").read_text())["split"]
    assert split["model_trained_on"] == [str(data)] and "test_frac" not in split and "seed" not in split
    md = (tmp_path / "e" / "report.md").read_text()
    assert "including any the model trained on" in md and "including any the model trained on" in res.stdout
    assert "test_frac" not in md and "{'" not in md  # was: Python dicts
    other = tmp_path / "o.jsonl"
    other.write_text(data.read_text())
    res = run("eval", "--model", model, "--data", other, "--out", tmp_path / "t")  # --split test: the recorded split
    assert res.exit_code == 0 and "trained on" not in res.stderr
    assert "(test_frac 0.25, seed 3, rule id)" in (tmp_path / "t" / "report.md").read_text()


def test_eval_report_lists_skipped_baselines_and_no_tau_for_one_row(tiny_model_dir, tmp_path):
    """Finding 7, and polish: skipped baselines were named on stderr only; tau of one row was
    0.000; ``--baselines "a, b"`` was refused for its space."""
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "hi", "response": "hello there"}) + "\n")
    base = tmp_path / "base.jsonl"
    base.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "a " * i}) + "\n" for i in (1, 50)))
    res = run("eval", "--model", tiny_model_dir, "--data", one, "--split", "all", "--baseline-data", base,
              "--baselines", "constant, tfidf_ridge", "--out", tmp_path / "e")
    assert res.exit_code == 0, res.output
    md = (tmp_path / "e" / "report.md").read_text()
    assert "Baselines skipped:" in md and "- tfidf_ridge: " in md
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert set(report["all"]) == {"model", "constant"} and report["all"]["model"]["kendall_tau"] is None
    assert "| n/a |" in md and "the baselines trained on 2 --baseline-data samples" in md
    res = run("eval", "--model", tiny_model_dir, "--data", one, "--split", "all", "--baseline-data", base,
              "--baselines", "", "--out", tmp_path / "none")  # none asked for: none said to have trained
    assert res.exit_code == 0, res.output
    assert "2 --baseline-data samples read, no baseline fitted" in (tmp_path / "none" / "report.md").read_text()


def test_an_oversize_jsonl_row_is_read_past_in_pieces():
    import io

    from rlpredict.records import RecordError, bounded_lines, decode_line

    data = b'{"a": 1}\n' + b"x" * 25 + b"\n" + b'{"b": 2}\n' + b"z" * 40  # the last one unterminated
    lines = list(bounded_lines(io.BytesIO(data), limit=10))
    assert len(lines) == 4 and lines[0] == b'{"a": 1}\n' and lines[2] == b'{"b": 2}\n'
    for i in (1, 3):  # each oversize row is one bad row, its size said; memory held: one piece
        with pytest.raises(RecordError, match=f"a row of {(26, 40)[i // 2]:,} bytes"):
            decode_line(lines[i], i + 1)


# ---- a user review's findings (December 2026) -----------------------------------------------------
def test_user_text_is_never_read_as_markup(bundle_fp32, tmp_path):
    """A '[' in a prompt, a file name or a row is text: it was a MarkupError (exit 1) or vanished."""
    res = run("predict", "-m", bundle_fp32, "[/b] x", "a[i] [bold]b")
    assert res.exit_code == 0, res.output
    assert "[/b] x" in res.stdout and "a[i] [bold]b" in res.stdout
    data = tmp_path / "logs[red].jsonl"
    data.write_text(json.dumps({"prompt": "hi", "response": "yo"}) + "\n"
                    + json.dumps({"messages": [{"role": "[/bold]", "content": "hi"},
                                               {"role": "assistant", "content": "yo"}]}) + "\n")
    res = run("drift", "-m", bundle_fp32, "--data", data, "--on-error", "skip", "--min-rows", "1")
    assert res.exit_code == 4, res.output  # one row, one draw: no bound could break, nothing judged
    assert "source=logs[red]" in res.stdout
    # the skipped row in full, as `train` prints it: file:line, field and reason
    assert f"skipped {data}:2: field 'messages': message 0 has unknown role '[/bold]'" in res.stderr


def test_predict_shows_the_last_user_message_with_terminal_controls_escaped(bundle_fp32, tmp_path):
    """The table showed the last message (an assistant's reply the model never read), and wrote
    a prompt's ESC sequences to the terminal as they were (clearing or recolouring it)."""
    import subprocess
    import sys

    lines = [json.dumps({"prompt": "\x1b[2J\x1b[31mred"}),
             json.dumps({"messages": [{"role": "user", "content": "Write an essay"},
                                      {"role": "assistant", "content": "SECRET answer"}]})]
    res = subprocess.run([sys.executable, "-m", "rlpredict.cli", "predict", "-m", str(bundle_fp32), "--jsonl"],
                         input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "160"})
    assert res.returncode == 0, res.stderr
    assert "\x1b" not in res.stdout and "\\x1b[2J\\x1b[31mred" in res.stdout, res.stdout
    assert "Write an essay" in res.stdout and "SECRET" not in res.stdout


def test_bad_utf8_after_a_byte_order_mark_is_named_by_its_line_and_byte(tmp_path):
    """The recipe and JSON readers counted the byte from after a BOM and named no line."""
    from rlpredict.json_file import read_json

    (tmp_path / "r.toml").write_bytes(b'\xef\xbb\xbfmax_steps = 2\nlr = "\xff"\n')
    with pytest.raises(ValueError, match=r"r\.toml: line 2: not UTF-8 text \(byte 6\)"):
        TrainConfig.load(tmp_path / "r.toml")
    (tmp_path / "r.json").write_bytes(b'\xef\xbb\xbf{"max_steps": "\xff"}\n')
    with pytest.raises(ValueError, match=r"r\.json: line 1: not valid UTF-8 \(byte 18\)"):
        read_json(tmp_path / "r.json")


def test_predict_json_reaches_a_terminal_that_cannot_show_the_prompt(bundle_fp32):
    """Was: exit 2, "'ascii' codec can't encode character", after every prediction was made."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "rlpredict.cli", "predict", "-m", str(bundle_fp32), "--json", "h\u00e9llo"],
                         capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["predictions"][0]["input"] == "h\u00e9llo" and b"\\u00e9" in res.stdout


def test_the_tables_prompt_column_escapes_only_what_it_shows():
    """At most 48 characters, escaped (was: the whole prompt escaped, then clipped: 26 s and
    1.9 GB for a prompt of 20 M zero-width spaces)."""
    import time

    from rlpredict.cli_bundle import _shown

    assert _shown("a\x1bb\nc") == "a\\x1bb c" and _shown("x" * 48) == "x" * 48
    assert _shown("x" * 49) == "x" * 47 + "…" and _shown("\u200b" * 100) == ("\\u200b" * 8)[:47] + "…"
    t0 = time.perf_counter()
    assert _shown("a" + "\u200b" * (20 << 20)).startswith("a\\u200b")
    assert time.perf_counter() - t0 < 2.0  # (a bound far above the 0.06 s measured, far below 26 s)


def test_an_option_given_twice_is_refused_not_the_last_kept(bundle_fp32, tmp_path):
    """Was: click's rule, the last value kept without a word (``--out a --out b`` wrote b);
    a repeatable option (``--data``) is still taken each time."""
    res = run("annotate", tmp_path / "in.jsonl", "-o", tmp_path / "a.jsonl", "-o", tmp_path / "b.jsonl",
              "-m", bundle_fp32)
    assert res.exit_code == 2 and res.output.count("\n") == 1 and (
        "annotate: --output/-o is given more than once; give it once (see '") in res.output, res.output
    logs = tmp_path / "logs.jsonl"
    logs.write_text(json.dumps({"prompt": "hi", "response": "yo"}) + "\n")
    res = run("drift", "-m", bundle_fp32, "--data", logs, "--data", logs, "--min-rows", "1", "-m", bundle_fp32)
    assert res.exit_code == 2 and "--model/-m is given more than once" in res.output, res.output


def test_default_rejects_name_drops_only_the_format_suffixes():
    from rlpredict.serve.annotate import default_rejects_path

    assert default_rejects_path("d/run_2024.01.05.ann.jsonl") == Path("d/run_2024.01.05.ann.rejects.jsonl")
    assert default_rejects_path("out.csv.gz") == Path("out.rejects.jsonl")  # was: run_2024.rejects.jsonl above
    assert default_rejects_path("out.pq") == Path("out.rejects.jsonl")
    assert default_rejects_path("run.05.CSV.GZ") == Path("run.05.rejects.jsonl")  # as detect_format reads it


def test_a_folder_output_lands_with_plain_modes_whatever_a_library_wrote(tmp_path):
    from rlpredict.outputs import _UMASK

    outside = tmp_path / "private"
    outside.mkdir(mode=0o700)
    with output_dir(tmp_path / "d", force=False, tool="t") as tmp:  # safetensors saves its file 0600
        (tmp / "model.safetensors").write_bytes(b"1")
        (tmp / "model.safetensors").chmod(0o600)
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "f").write_text("x")
        (tmp / "link").symlink_to(outside)
    assert (tmp_path / "d" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_UMASK
    assert (tmp_path / "d" / "sub").stat().st_mode & 0o777 == 0o777 & ~_UMASK
    assert outside.stat().st_mode & 0o777 == 0o700  # a link is not followed


def test_rows_of_a_json_file_are_named_by_their_line(tmp_path):
    from rlpredict.records import iter_rows

    cases = {"obj.json": '{"meta": {"data": 1},\n "other": [\n {"a": 1},\n {"a": 2}\n], "data": [\n{"a": 3}]}\n',
             "arr.json": '[\n {"a": 1},\n\n {"a": 2}\n]\n', "one.json": '\n\n{"a": 1}\n'}
    got = {}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        got[name] = [(loc.rsplit(":", 1)[1], row) for loc, row in iter_rows(tmp_path / name)]
    assert got == {"obj.json": [("6", {"a": 3})],  # (was: "item 0"; "data" given twice is refused now)
                   "arr.json": [("2", {"a": 1}), ("4", {"a": 2})], "one.json": [("3", {"a": 1})]}


def test_a_json_file_is_read_whole_only_up_to_its_limit_and_past_a_byte_order_mark(tmp_path, monkeypatch):
    """``read_json`` (manifests, profiles, confusion matrices): a file over ``MAX_JSON_BYTES`` is
    refused before it is read (was: any size, held whole: 2 GB of memory for a 1 GB file given
    as ``--profile``); a leading UTF-8 byte-order mark is read past, as CSV and TOML readers do
    (was: "Unexpected UTF-8 BOM")."""
    from rlpredict import json_file

    (tmp_path / "bom.json").write_bytes(b'\xef\xbb\xbf{"a": 1}')
    assert json_file.read_json(tmp_path / "bom.json") == {"a": 1}
    monkeypatch.setattr(json_file, "MAX_JSON_BYTES", 16)
    (tmp_path / "big.json").write_text('{"name": "' + "x" * 20 + '"}')
    with pytest.raises(ValueError, match=r"big\.json: over 0 MiB, the limit of a JSON file read whole"):
        json_file.read_json(tmp_path / "big.json")


@pytest.mark.parametrize("args", [["simulate", "--trace", "t.csv", "--rate-scale", "1_0"],
                                  ["simulate", "--trace", "t.csv", "--max-requests", "5_0"],
                                  ["capacity", "--trace", "t.csv", "--target", "0_9"],
                                  ["simulate", "--trace", "t.csv", "--slo-ttft", "\u0663"]])
def test_number_options_take_plain_digits_only(args):
    """Both CLIs' number options, as the scripts' and the data readers' numbers (was:
    ``--rate-scale 1_0`` ran at 10x, ``--target 0_9`` read as 9, as Python's ``float`` reads them)."""
    from ecoserve_sched.cli import app as eco_app

    res = CliRunner().invoke(eco_app, args)
    one_error_line(res, f"Invalid value for '{args[-2]}'", f"{args[-1]!r} is not a", "in plain digits")


def test_rlpredict_number_options_take_plain_digits_only():
    one_error_line(run("predict", "--threads", "1_0", "hi"), "'--threads'", "'1_0' is not a whole number in plain digits")


def test_a_log_folder_names_links_it_does_not_read_and_files_it_would_read_twice(tmp_path):
    """A folder given as logs: a link to a folder (not followed), a broken link and a second
    name of a file (a hard or symbolic link) are bad "rows" naming the entry (was: the first
    two left out, the last read twice, without a word); a link in a folder to a file also
    given is refused up front, as the same file given twice is."""
    from rlpredict.outputs import repeated_input
    from rlpredict.records import RecordError, data_files, iter_rows

    logs, other = tmp_path / "logs", tmp_path / "other"
    logs.mkdir()
    other.mkdir()
    (logs / "a.jsonl").write_text('{"prompt": "x", "output_tokens": 3}\n')
    (other / "b.jsonl").write_text('{"prompt": "y", "output_tokens": 4}\n')
    os.link(logs / "a.jsonl", logs / "a_copy.jsonl")
    (logs / "alias.jsonl").symlink_to("a.jsonl")
    (logs / "dang.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
    (logs / "linked").symlink_to(other)
    got = [(loc.removeprefix(str(logs) + "/"), row.reason if isinstance(row, RecordError) else row)
           for loc, row in iter_rows(logs)]
    assert got == [("a.jsonl:1", {"prompt": "x", "output_tokens": 3}),
                   ("a_copy.jsonl", f"the same file as {logs / 'a.jsonl'} (a link): its rows would count twice"),
                   ("alias.jsonl", f"the same file as {logs / 'a.jsonl'} (a link): its rows would count twice"),
                   ("dang.jsonl", "a broken link, or a loop: give its target as another input"),
                   ("linked", "a link to a folder, which is not followed: give its target as another input")]
    (other / "c").mkdir()
    (other / "c" / "b_link.jsonl").symlink_to(other / "b.jsonl")
    (other / "c" / "b.jsonl.1").write_text("{}\n")  # a rotated log: named, not left out
    (other / "c" / "README.md").write_text("notes")  # not data: left out, as before
    assert [(f.name, problem.reason if problem else None) for f, problem in data_files(other / "c")] == [
        ("b.jsonl.1", "a data file named with a suffix after its format, which is not read: rename it"),
        ("b_link.jsonl", None)]
    assert repeated_input([other / "c", other / "b.jsonl"]) == (
        f"{other / 'c' / 'b_link.jsonl'} (in {other / 'c'}) is the same file as {other / 'b.jsonl'}, also given "
        "(a link; its rows would count twice)")


@pytest.mark.parametrize("row, key", [
    ('{"messages": [{"role": "user", "content": "hi", "content": "a long essay"}]}', "messages[0].content"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "role": "user", "content": "a"}]}',
     "messages[1].role"),
])
def test_a_message_that_gives_its_role_or_text_twice_is_refused(row, key):
    """As a top-level field given twice (was: the last value kept without a word)."""
    from rlpredict.records import RecordError, parse_json

    with pytest.raises(RecordError, match=re.escape(f"key {key!r} is given twice in one JSON object")):
        parse_json(row, frozenset({"messages"}))
    with pytest.raises(RecordError, match=re.escape(f"key {key!r} is given twice")):
        parse_json(row, frozenset({"messages", "usage.completion_tokens"}), dotted=True)
    assert parse_json('{"messages": [{"role": "user", "content": "hi", "name": 1, "name": 2}]}',
                      frozenset({"messages"}))["messages"][0]["name"] == 2  # a key not read may repeat


def test_eval_split_is_checked_as_a_choice(tmp_path):
    one_error_line(run("eval", "--model", tmp_path, "--data", tmp_path / "d.jsonl", "--split", "bogus"),
                   "--split", "test", "all")


def test_a_bundle_is_never_written_inside_the_folder_it_is_made_from(tmp_path):
    model = tmp_path / "m1"
    model.mkdir()
    with pytest.raises(OutputError, match="lies inside the input"):
        check_paths([model], [("--out", model / "sub")], apart=[model])
    check_paths([model], [("--out", model / "eval")])  # eval's default report folder is inside its model


def test_drift_shows_the_digits_that_break_a_bound():
    from rlpredict.serve.drift import _beyond

    assert _beyond(0.10004, ">", 0.1) == "0.10004 (> 0.10000)"  # was: "0.100 (> 0.100)"
    assert _beyond(0.52, "<", 0.6) == "0.520 (< 0.600)"


def test_the_python_api_takes_messages_by_the_rule_annotate_takes_them(bundle_fp32):
    from rlpredict.serve.runtime import Predictor

    p = Predictor.load(bundle_fp32, threads=1)
    with pytest.raises(ValueError, match="request 0: field 'messages': message 0 content: expected a string, got int"):
        p.predict([[{"role": "user", "content": 5}]])  # was: predicted on "5"
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "image_url", "image_url": {}}]}]
    assert p.texts([parts]) == p.texts([[{"role": "user", "content": "hello"}]])  # was: the list's repr
    with pytest.raises(ValueError, match="request 1: not valid Unicode"):
        p.predict(["ok", "a\ud800b"])


def test_an_exported_bundle_records_the_training_split(tiny_model_dir, tmp_path):
    from rlpredict.serve.calibrate import held_out
    from rlpredict.train.export import export_bundle

    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    (model / "training_summary.json").write_text('{"data": {"split": {"test_frac": 0.2, "seed": 4}}}')
    manifest = export_bundle(model, tmp_path / "b", parity_n=4)
    # without an `eval` report; a summary without a rule was an `id` split, said in the bundle
    assert manifest["training_split"] == {"test_frac": 0.2, "seed": 4, "rule": "id"}
    assert held_out([], manifest, "test", None, None)[1].endswith("(test_frac 0.2, seed 4, rule id)")


@pytest.mark.parametrize("content", ['{"version": "1.0", ', '{"a": 1}'])
def test_an_rl_tokenizer_file_that_does_not_load_is_named(tmp_path, content):
    """Was: the tokenizers library's bare Exception, reported as a bug without the file."""
    tok = tmp_path / "tok.json"
    tok.write_text(content)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "hi", "response": "hello"}\n')
    one_error_line(run("train", "--data", data, "--out", tmp_path / "m", "--rl-tokenizer", tok),
                   f"{tok}: not a tokenizer.json")


def test_an_interrupt_a_library_swallows_still_stops_the_write(tmp_path):
    """``ecoserve calibrate`` went on and wrote its profile (exit 0) when Ctrl-C or SIGTERM
    landed in transformers' ``__del__``, where Python only prints the exception."""
    import signal

    from rlpredict.cli_boundary import _sigterm_as_interrupt
    from rlpredict.outputs import output_dir, write_text_atomic

    class Swallows:
        def __del__(self):
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # the boundary's handler

    with pytest.raises(KeyboardInterrupt), _sigterm_as_interrupt():
        Swallows()  # the KeyboardInterrupt raised in __del__ is swallowed (and not printed)
        write_text_atomic(tmp_path / "out.txt", "x")
    with pytest.raises(KeyboardInterrupt), _sigterm_as_interrupt():
        Swallows()
        with output_dir(tmp_path / "folder", force=False, tool="test") as tmp:
            (tmp / "a.txt").write_text("a")
    assert list(tmp_path.iterdir()) == []
    write_text_atomic(tmp_path / "out.txt", "x")  # forgotten once the command ended
    assert (tmp_path / "out.txt").read_text() == "x"


@pytest.mark.parametrize("name", [".", "", ".."])
def test_the_current_folder_is_no_output_folder(tmp_path, monkeypatch, name):
    """``compare --out .`` ran every simulation, then failed ("exists", or with --force "Device
    or resource busy"): the temporary folder was made inside the target."""
    from rlpredict.outputs import check_new_dir

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    why = "is blank" if name == "" else "is the current folder or holds it"  # ("" is refused as blank now)
    with pytest.raises(OutputError, match=why):
        check_new_dir(name, force=True, option="--out")
    with pytest.raises(OutputError, match=r"is blank|is the current folder or holds it"), \
            output_dir(name, force=True, tool="test"):
        pass
    assert list(work.iterdir()) == []


def test_a_folder_holding_another_runs_output_is_refused_without_advising_force(tmp_path):
    """A folder of ours with another run's output saved inside it: refused the same way with or
    without ``--force`` (was: "exists; pass --force to replace it", then, with --force, "holds
    files no tool of ours wrote": advice certain to fail; a reviewer's find)."""
    out = tmp_path / "cmp"
    with output_dir(out, force=False, tool="ecoserve compare") as tmp:
        (tmp / "results.json").write_text("{}")
    with output_dir(out / "nested", force=False, tool="benchmarks/scenario_grid.py") as tmp:
        (tmp / "results.json").write_text("{}")
    for force in (False, True):
        with pytest.raises(OutputError, match=r"holds files no tool of ours wrote.*nested"), \
                output_dir(out, force=force, tool="ecoserve compare"):
            pass
    assert (out / "nested" / "results.json").is_file()


def test_a_max_length_beyond_the_encoders_positions_is_refused_before_the_data(tiny_model_dir, tmp_path):
    """Was: accepted by ``train`` (and ``eval`` of such a model), then a RuntimeError in the
    first batch with a long prompt, mid-run; only ``export`` checked it."""
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    meta = json.loads((model / "rlpredict.json").read_text())
    meta["input"]["max_length"] = 200  # the tiny encoder has 128 positions
    (model / "rlpredict.json").write_text(json.dumps(meta))
    data = _labelled(tmp_path)
    one_error_line(run("eval", "--model", model, "--data", data, "--out", tmp_path / "e"),
                   "max_length 200 exceeds the encoder's 128 positions")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data = ["{data}"]\nencoder = "{tiny_model_dir}"\nmax_length = 200\n')
    one_error_line(run("train", "-c", cfg, "--out", tmp_path / "t"), "max_length 200 exceeds the encoder's 128 positions")
    assert not (tmp_path / "t").exists()


def test_the_log_and_trace_readers_bound_a_line_as_annotate_does(tmp_path):
    """Was: a 1.5 MB .gz holding one 1.5 GB line ran ``drift`` and ``ecoserve simulate`` out of
    memory ("error: out of memory", no file named); annotate's 64 MiB rule now holds for both."""
    from rlpredict.data import load_samples
    from rlpredict.records import MAX_ROW_BYTES

    huge = b'{"prompt": "hi", "response": "' + b"a" * MAX_ROW_BYTES + b'"}\n'
    logs = tmp_path / "logs.jsonl.gz"
    logs.write_bytes(gzip.compress(huge + b'{"prompt": "q", "response": "r"}\n', compresslevel=1))
    samples, report = load_samples([logs], on_error="skip")
    assert len(samples) == 1 and report.n_skipped == 1
    assert "logs.jsonl.gz:1" in report.examples[0] and "over the 64 MiB limit" in report.examples[0]
    trace = tmp_path / "t.jsonl.gz"
    trace.write_bytes(gzip.compress(b'{"arrival_time_s": 0, "input_tokens": 1, "output_tokens": 1, "pad": "'
                                    + b"a" * MAX_ROW_BYTES + b'"}\n', compresslevel=1))
    from ecoserve_sched.trace import TraceError, read_trace

    with pytest.raises(TraceError, match=r"t\.jsonl\.gz:1: a row of [\d,]+ bytes, over the 64 MiB limit"):
        read_trace(trace)


def test_predict_reads_stdin_lines_as_annotate_does(bundle_fp32):
    """Lines split on "\\n" only (a \\u2028 in a prompt is text), CRLF ends taken off, and each
    line bounded as annotate bounds it (was: all of stdin held, a 100 MB line accepted)."""
    res = CliRunner().invoke(app, ["predict", "-m", str(bundle_fp32), "--json"],
                             input="a\u2028b\r\nsecond\r\n".encode())
    assert res.exit_code == 0, res.output
    assert [p["input"] for p in json.loads(res.stdout)["predictions"]] == ["a\u2028b", "second"]


def test_a_csv_record_left_open_is_bounded_in_every_csv_reader(bundle_fp32, tmp_path):
    """A quote left open made the rest of the file one record, held whole (908 MB for a 100 MB
    file, and one 100 MB reject in skip mode): a record over 64 Mi characters is an error at the
    line where it starts, in annotate (both modes), the log reader and the trace reader."""
    from rlpredict.data import load_samples
    from rlpredict.records import MAX_ROW_BYTES, RecordError

    line = b"x" * (MAX_ROW_BYTES // 2) + b"\n"
    for name, header, good in (("t.csv.gz", "prompt,arrival_time_s,input_tokens,output_tokens", "hi,0,1,1"),
                               ("l.csv.gz", "prompt,response", "hi,yo")):
        src = tmp_path / name
        with gzip.open(src, "wb", compresslevel=1) as f:  # three lines of 32 Mi characters after the quote
            f.write(f'{header}\n{good}\n"oops,{good}\n'.encode())
            for _ in range(3):
                f.write(line)
        if name.startswith("t"):
            for mode in ("fail", "skip"):
                res = run("annotate", src, "-o", tmp_path / f"o.{mode}.csv.gz", "-m", bundle_fp32, "--on-error", mode)
                one_error_line(res, "t.csv.gz: a record of over 64 Mi characters from line 3 (a quote left open?)")
                assert not (tmp_path / f"o.{mode}.csv.gz").exists()
            from ecoserve_sched.trace import TraceError, read_trace

            with pytest.raises(TraceError, match=r"t\.csv\.gz: a record of over 64 Mi characters from line 3"):
                read_trace(src)
        else:
            with pytest.raises(RecordError, match=r"l\.csv\.gz: a record of over 64 Mi characters from line 3"):
                load_samples([src], on_error="skip")


@pytest.mark.parametrize(("config", "ok", "too_long"), [
    ({"model_type": "bert", "max_position_embeddings": 512}, 512, 513),
    ({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1}, 512, 513),  # ids start at 2
    ({"model_type": "deberta-v2", "max_position_embeddings": 512, "position_biased_input": False}, 4096, None),
])
def test_the_position_check_follows_the_encoders_position_scheme(tmp_path, config, ok, too_long):
    from rlpredict.train.encoders import check_positions

    (tmp_path / "config.json").write_text(json.dumps(config))
    check_positions(tmp_path, ok, "enc")
    if too_long is not None:
        with pytest.raises(ValueError, match=f"max_length {too_long} exceeds the encoder's {ok} positions"):
            check_positions(tmp_path, too_long, "enc")


def test_predict_says_what_pred_and_reserve_are(bundle_fp32):
    """The default reserve (the predicted bucket's reservation) can be below pred (the
    distribution's median): the table says which is which."""
    for args, reserve in (((), "reservation"), (("--reserve-quantile", "0.9"), "0.9 quantile")):
        res = run("predict", "-m", bundle_fp32, *args, "hi")
        assert res.exit_code == 0, res.output
        text = " ".join(res.output.split())
        assert "pred: the median of the whole predicted distribution (it may lie outside that bucket)" in text and reserve in text


def test_a_config_files_encoder_folder_is_relative_to_the_file(tmp_path):
    """As its ``data`` paths (was: relative to the working directory)."""
    (tmp_path / "cfg").mkdir()
    cfg = tmp_path / "cfg" / "r.toml"
    cfg.write_text('[train]\ndata = ["d.jsonl"]\nencoder = "enc"\n')
    c = TrainConfig.load(cfg)
    assert c.encoder == str(tmp_path / "cfg" / "enc") and c.data == [str(tmp_path / "cfg" / "d.jsonl")]
    cfg.write_text('[train]\nencoder = "minilm"\n')
    assert TrainConfig.load(cfg).encoder == "minilm"


def test_predict_takes_at_most_so_many_stdin_prompts(bundle_fp32, monkeypatch):
    import rlpredict.cli_bundle as cli_bundle

    monkeypatch.setattr(cli_bundle, "MAX_STDIN_PROMPTS", 3)
    res = CliRunner().invoke(app, ["predict", "-m", str(bundle_fp32), "--json"], input="a\n\nb\nc\nd\ne\n")
    assert res.exit_code == 2 and "stdin: line 5: more than 3 prompts" in res.output and "annotate" in res.output
    monkeypatch.setattr(cli_bundle, "MAX_STDIN_BYTES", 10)
    big = CliRunner().invoke(app, ["predict", "-m", str(bundle_fp32), "--json"], input="hello\nthere world\n")
    assert big.exit_code == 2 and "stdin: line 2: more than 3 prompts or 0 MiB" in big.output
    ok = CliRunner().invoke(app, ["predict", "-m", str(bundle_fp32), "--json"], input="a\nb\nc\n")
    assert ok.exit_code == 0 and len(json.loads(ok.stdout)["predictions"]) == 3


def test_force_never_replaces_another_tools_folder(tiny_model_dir, tmp_path):
    """``export --out <a trained model> --force`` replaced the model (hours of training) with a
    bundle: ``--force`` replaces only a folder the same tool wrote (``output_dir``'s
    ``only_own``, the default, and each command's check before the work)."""
    model = tmp_path / "model"
    with output_dir(model, force=False, tool="rlpredict train") as tmp:  # as train writes it
        shutil.copytree(tiny_model_dir, tmp, dirs_exist_ok=True)
    before = snapshot(model)
    for force in ((), ("--force",)):
        one_error_line(run("export", "--model", tiny_model_dir, "--out", model, *force),
                       "is rlpredict train's output folder, not rlpredict export's")
    assert snapshot(model) == before
    with pytest.raises(OutputError, match="not mine's"), output_dir(model, force=True, tool="mine"):
        pass  # the rule itself, for every tool
    assert snapshot(model) == before


def test_eval_counts_a_copy_that_gives_token_counts_instead_of_responses(tiny_model_dir, tmp_path):
    """The overlap was keyed on the response text, which the baselines never read: a copy of
    --data giving ``output_tokens`` instead of responses counted 0 (a reviewer of the fix)."""
    from rlpredict.rl_tokenizers import count_tokens

    data = _labelled(tmp_path)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    counts = count_tokens([r["response"] for r in rows], "llama3")
    copy = tmp_path / "counts.jsonl"
    copy.write_text("".join(json.dumps({"prompt": r["prompt"], "output_tokens": int(n)}) + "\n"
                            for r, n in zip(rows, counts, strict=True)))
    one_error_line(run("eval", "--model", tiny_model_dir, "--data", data, "--split", "all", "--out", tmp_path / "e",
                       "--baseline-data", copy), "every one of the 40 scored samples")


def test_train_never_deletes_another_tools_folder_given_as_checkpoint_dir(tiny_model_dir, tmp_path):
    """``train --checkpoint-dir <a trained model> --force`` deleted the model (a reviewer of the
    --force rule)."""
    victim = tmp_path / "victim"
    with output_dir(victim, force=False, tool="rlpredict train") as tmp:
        shutil.copytree(tiny_model_dir, tmp, dirs_exist_ok=True)
    before = snapshot(victim)
    one_error_line(run("train", "--data", _labelled(tmp_path), "--out", tmp_path / "new", "--checkpoint-dir", victim,
                       "--max-steps", "1", "--force"), "--checkpoint-dir is rlpredict train's output folder")
    assert snapshot(victim) == before and not (tmp_path / "new").exists()


@pytest.mark.parametrize("command", [["train", "--out", "o"], ["stack", "--model", "m", "--out", "o"],
                                     ["calibrate", "--out", "o"], ["drift"]])
def test_a_blank_data_path_is_refused(command, tmp_path, monkeypatch):
    """``--data ""`` (an unset variable) read the whole current folder (eval refused it; train,
    stack, calibrate and drift did not)."""
    monkeypatch.chdir(tmp_path)
    one_error_line(run(*command, "--data", ""), "--data", "empty")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("cli", "args", "says"), [
    ("rlpredict", ["predict", "--max-length", "3"], "error: rlpredict predict: No such option: --max-length"),
    ("rlpredict", ["train", "--epochs", "-1"], "error: rlpredict train: Invalid value for '--epochs'"),
    ("rlpredict", ["--bogus"], "error: rlpredict: No such option: --bogus"),
    ("ecoserve", ["bogus"], "error: ecoserve: No such command 'bogus'."),
    ("ecoserve", ["compare", "--policies"], "error: ecoserve compare: Option '--policies' requires an argument."),
    ("ecoserve", ["simulate", "--rate-scale", "abc"], "error: ecoserve simulate: Invalid value for '--rate-scale'"),
    # a bad choice, without pydantic's "Value error, " (was: in typer's words)
    ("rlpredict", ["annotate", "--engine", "bogus", "x"],
     "error: rlpredict annotate: Invalid value for '--engine': 'bogus' is not one of 'local', 'ray'."),
])
def test_a_bad_option_is_one_line_naming_the_command(cli, args, says):
    """A bad option, argument or command: one line naming the command and pointing at its
    ``--help``, exit 2 (was: typer's usage lines and a boxed message wrapped at 80 columns)."""
    module = {"rlpredict": "rlpredict.cli", "ecoserve": "ecoserve_sched.cli"}[cli]
    proc = subprocess.run([sys.executable, "-c", f"from {module} import main; main()", *args], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}, timeout=120)
    assert (proc.returncode, proc.stdout) == (2, "")
    (line,) = proc.stderr.splitlines()
    assert line.startswith(says) and line.endswith("--help')"), line


@pytest.mark.parametrize(("cli", "command", "option"), [
    ("rlpredict", "annotate", "--drop-final-assistant / --no-drop-final-assistant"),
    ("rlpredict", "annotate", "--reserve-quantile"),
    ("ecoserve", "capacity", "--max-normalized-latency"),
    ("ecoserve", "simulate", "--gpu-memory-utilization"),
])
def test_help_shows_long_option_names_whole_at_80_columns(cli, command, option):
    """``--help`` in an 80-column terminal (was: ``--gpu-memory-utiliza…``, rich's table cut
    the names), and a flag takes no ``<bool>`` value, ``--help`` included."""
    module = {"rlpredict": "rlpredict.cli", "ecoserve": "ecoserve_sched.cli"}[cli]
    proc = subprocess.run([sys.executable, "-c", f"from {module} import main; main()", command, "--help"],
                          capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert option in proc.stdout and "…" not in proc.stdout and "<bool>" not in proc.stdout
    assert max(map(len, proc.stdout.splitlines())) <= 80


def test_a_failed_annotate_into_a_log_is_one_line(tmp_path):
    """stderr not a terminal (a log, a pipe): no progress bar, so a bad row is one line (was: a
    frozen "annotating noprompt.csv 0/96 bytes" bar line before it)."""
    src = tmp_path / "noprompt.csv"
    src.write_text("text,x\nhello,1\n")
    proc = subprocess.run([sys.executable, "-c", "from rlpredict.cli import main; main()", "annotate", str(src),
                           "-o", str(tmp_path / "out.csv")], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"error: {src}: line 2: neither field 'prompt' nor 'messages'"), line


def test_annotate_into_a_log_says_its_progress_in_lines(tmp_path, monkeypatch):
    """Not a terminal: a line every 30 s instead of a bar (as the Ray engine's)."""
    from rlpredict.serve import annotate as annotate_mod

    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"hello {i}"}) + "\n" for i in range(10)))
    clock = iter(range(0, 10_000, 31))  # every call 31 s later
    monkeypatch.setattr(annotate_mod.time, "perf_counter", lambda: float(next(clock)))
    printed: list[str] = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
    with annotate_mod._progress(src, "jsonl", True) as update:
        update(src.stat().st_size / 2)
    assert printed == ["annotating t.jsonl: 50% after 31 s"]


def test_a_link_that_points_to_itself_is_one_line_as_input_and_as_output(tmp_path):
    """Was: Python's "Symlink loop" RuntimeError, an internal error (exit 1) from ``train``,
    ``eval`` and the scripts given one as --data or --out; as --out, once past that, the whole
    run and then "Not a directory"."""
    from rlpredict.outputs import repeated_input, resolved

    loop = tmp_path / "self.jsonl"
    loop.symlink_to(loop.name)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    assert resolved(loop).name == "self.jsonl" and repeated_input([loop, data]) is None
    one_error_line(run("train", "--data", loop, "--out", tmp_path / "m"), "a link to nothing (broken, or a loop)")
    one_error_line(run("train", "--data", data, "--out", loop), "--out is a link to nothing")
    assert loop.is_symlink() and not (tmp_path / "m").exists()
