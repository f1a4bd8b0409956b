"""annotate --engine ray: the same output as the local path, row for row, on a local Ray (2 CPUs).

One Ray for the module (starting it takes seconds). The traces hold a few thousand rows with bad
ones of every kind the local path rejects; each Ray run is compared with ``annotate_file``.
"""

from __future__ import annotations

import gzip
import json
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from rlpredict.outputs import OWNER_FILE
from rlpredict.serve.annotate import annotate_file
from rlpredict.serve.runtime import Predictor

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ROWS = 3000
CHUNK = 256


def trace_lines(n: int = ROWS) -> list[bytes]:
    """``n`` JSONL lines: prompts, conversations, and bad rows of each kind, plus blank lines."""
    bad = [b"{not json", b"[1, 2]", b'{"id": -1}', b'{"prompt": 7}', b'{"prompt": "\\ud800"}',
           b'{"prompt": "caf\xe9"}', b'{"messages": "[oops"}', b'{"messages": []}']
    out = []
    for i in range(n):
        if i % 53 == 11:
            out.append(bad[(i // 53) % len(bad)])
        elif i % 97 == 5:
            out.append(b"   ")
        elif i % 7 == 3:
            msgs = [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": "hi"},
                    {"role": "user", "content": f"tell me about topic {i % 31} in detail"}]
            out.append(json.dumps({"id": i, "messages": msgs, "t": i / 10}).encode())
        else:
            out.append(json.dumps({"id": i, "prompt": f"question {i}: explain item {i % 17}",
                                   "arrival_time_s": i * 0.25, "tenant": ["a", "b"][i % 2]}).encode())
    return out


def write_jsonl(path: Path, lines: list[bytes]) -> Path:
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def write_parquet(path: Path, n: int = ROWS) -> Path:
    rows = [{"id": i, "prompt": None if i % 41 == 7 else f"request {i} about {i % 23}",
             "arrival_time_s": i * 0.5, "tags": [f"t{i % 3}"]} for i in range(n)]
    table = pa.Table.from_pylist(rows).replace_schema_metadata({"source": "test"})
    pq.write_table(table, path)
    return path


def unzip(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def predictor(bundle_fp32) -> Predictor:
    return Predictor.load(bundle_fp32, threads=1)


def local(predictor: Predictor, src: Path, dst: Path, **kw):
    return annotate_file(predictor, src, dst, on_error="skip", chunk_rows=CHUNK, **kw)


def test_without_ray_one_line_how_to_install(bundle_fp32, tmp_path, monkeypatch):
    from rlpredict.cli import app

    src = write_jsonl(tmp_path / "in.jsonl", trace_lines(5))
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails
    r = CliRunner().invoke(app, ["annotate", str(src), "-o", str(tmp_path / "out.jsonl"),
                                 "--model", str(bundle_fp32), "--engine", "ray"])
    assert r.exit_code == 2, r.output
    assert "-e '.[ray]'" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out.jsonl").exists()
    r = CliRunner().invoke(app, ["annotate", str(src), "-o", str(tmp_path / "o.jsonl"),
                                 "--model", str(bundle_fp32), "--num-workers", "2"])
    assert r.exit_code == 2 and "--engine ray" in r.output
    r = CliRunner().invoke(app, ["annotate", str(src), "-o", str(tmp_path / "o.jsonl"),  # was: ignored
                                 "--model", str(bundle_fp32), "--engine", "ray", "--batch-size", "8"])
    assert r.exit_code == 2 and "only with --engine local" in r.output


def test_an_unreachable_address_and_a_failed_worker_are_one_line():
    """``--ray-address`` pointing nowhere: Ray retried for 13 minutes, then named another
    address; a worker that could not start (another environment on one node) was reported as a
    bug with Ray's traceback."""
    from rlpredict.serve.annotate import AnnotateError
    from rlpredict.serve.annotate_ray import _check_reachable, _unwrapped

    t = time.perf_counter()
    with pytest.raises(AnnotateError, match=r"--ray-address 127\.0\.0\.1:1: cannot reach a Ray cluster there"):
        _check_reachable("127.0.0.1:1", timeout_s=2)
    assert time.perf_counter() - t < 3
    with pytest.raises(AnnotateError, match="expected HOST:PORT"):
        _check_reachable("head:port")

    class RayError(Exception):
        pass

    class ActorDiedError(RayError):
        pass

    fake = SimpleNamespace(exceptions=SimpleNamespace(RayError=RayError, ActorDiedError=ActorDiedError))
    err = ActorDiedError("The actor died because of an error raised in its creation task, \x1b[36mray::MapWorker"
                         "\x1b[39m\nTraceback (most recent call last):\n  ...\nImportError: no module named onnxruntime\n")
    other = RayError("a task failed")  # not the setup's: stays what it was (a bug, with its traceback)
    with pytest.raises(RayError, match="a task failed"), _unwrapped(fake, iter(())):
        raise other
    with (pytest.raises(AnnotateError, match=r"^a Ray worker failed: ImportError: no module named onnxruntime$"),
          _unwrapped(fake, iter(()))):
        raise err


@pytest.mark.parametrize(("address", "raised", "says"), [
    ("auto", ConnectionError("Could not find any running Ray instance. Please specify ... `--address` flag"),
     "--ray-address auto: no running Ray cluster on this machine (start one with `ray start --head`"),
    ("foo", ValueError("Invalid address format: foo"), "--ray-address foo: Invalid address format: foo"),
])
def test_ray_init_errors_name_the_option(monkeypatch, address, raised, says):
    """Were Ray's words alone: its `--address` flag, or no option named."""
    from rlpredict.serve import annotate_ray as ar
    from rlpredict.serve.annotate import AnnotateError

    def init(**kw):
        raise raised

    monkeypatch.setattr(ar, "import_ray", lambda: SimpleNamespace(is_initialized=lambda: False, init=init))
    with pytest.raises(AnnotateError) as e, ar.ray_session(address):
        pass
    assert str(e.value).startswith(says)


def test_jsonl_gz_equals_local_and_a_killed_worker_loses_no_row(ray_local, bundle_fp32, predictor, tmp_path):
    from rlpredict.serve.annotate_ray import annotate_path

    src = write_jsonl(tmp_path / "in.jsonl.gz", trace_lines())
    want = local(predictor, src, tmp_path / "local.jsonl.gz")
    marker = tmp_path / "killed"
    # The worker that meets the 4th chunk exits (os._exit) the first time: Ray restarts it.
    got = annotate_path(src, tmp_path / "ray.jsonl.gz", bundle_fp32, on_error="skip", chunk_rows=CHUNK,
                        num_workers=2, _fault=(str(marker), 3 * CHUNK + 1))
    assert marker.exists()  # the fault fired
    assert (got.rows_in, got.rows_out, got.rows_rejected) == (want.rows_in, want.rows_out, want.rows_rejected)
    assert got.rows_in == got.rows_out + got.rows_rejected and got.rows_rejected > 40
    assert got.reasons == want.reasons and (got.workers, got.threads_per_worker) == (2, 1)
    assert unzip(tmp_path / "ray.jsonl.gz") == unzip(tmp_path / "local.jsonl.gz")  # row for row
    # a reader of one gzip member gets the first chunk (was: an empty member came first)
    first = zlib.decompressobj(wbits=31).decompress((tmp_path / "ray.jsonl.gz").read_bytes())
    assert first and unzip(tmp_path / "local.jsonl.gz").startswith(first)
    assert (tmp_path / "ray.rejects.jsonl").read_bytes() == (tmp_path / "local.rejects.jsonl").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.jsonl.gz", "killed", "local.jsonl.gz", "local.rejects.jsonl", "ray.jsonl.gz", "ray.rejects.jsonl"]


def test_folder_of_jsonl_and_parquet(ray_local, bundle_fp32, predictor, tmp_path):
    from rlpredict.serve.annotate_ray import annotate_path

    src = tmp_path / "in"
    (src / "day2").mkdir(parents=True)
    lines = trace_lines(1200)
    write_jsonl(src / "a.jsonl", lines[:700])
    write_jsonl(src / "day2" / "b.jsonl", lines[700:])
    write_jsonl(src / "empty.jsonl", [])
    write_parquet(src / "c.parquet", 1500)
    (src / "notes.txt").write_text("not an input\n")
    (src / "d.csv").write_text("prompt\nhi\n")  # not read by this engine: said (was: silently left out)
    (src / "e.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")  # another compression: said too (was: not)
    (tmp_path / "elsewhere").mkdir()
    write_jsonl(tmp_path / "elsewhere" / "o.jsonl", lines[:5])
    (src / "linked").symlink_to(tmp_path / "elsewhere")  # not followed, and said (was: its rows lost silently)
    (src / "gone.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
    said: list[str] = []
    got = annotate_path(src, tmp_path / "out", bundle_fp32, on_error="skip", chunk_rows=CHUNK, log=said.append,
                        threads=64)
    assert got.files == 4 and got.rows_in == got.rows_out + got.rows_rejected
    assert any(m.startswith("ray: ") and "(--threads 64 is more than a worker may take here)" in m for m in said)
    assert got.skipped_csv == ["d.csv"] and any("skipped 1 CSV file(s)" in m for m in said)
    assert got.skipped_other == ["e.jsonl.zst", "gone.jsonl (a broken link)",
                                 "linked (a link to a folder, not followed)"]
    assert any("skipped 3 file(s)" in m and "e.jsonl.zst" in m for m in said)
    for extra in ("e.jsonl.zst", "linked", "gone.jsonl"):
        (src / extra).unlink()
    out = tmp_path / "out"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        OWNER_FILE, "a.jsonl", "c.parquet", f"day2/{OWNER_FILE}", "day2/b.jsonl", "empty.jsonl"]
    # a sub-folder records what it holds: a file someone adds there is never replaced by --force
    from rlpredict.outputs import foreign_entries

    assert foreign_entries(out) == []
    (out / "day2" / "notes.txt").write_text("mine\n")
    assert foreign_entries(out) == [out / "day2" / "notes.txt"]
    rejects = [json.loads(line) for line in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    total = [0, 0, 0]
    assert (out / "empty.jsonl").read_bytes() == b"" and not [r for r in rejects if r["file"] == "empty.jsonl"]
    for name in ("a.jsonl", "day2/b.jsonl", "c.parquet"):  # (the local engine refuses an empty file)
        ref = tmp_path / "ref" / name
        s = local(predictor, src / name, ref, rejects=tmp_path / "ref" / f"{name}.rejects.jsonl")
        total = [total[0] + s.rows_in, total[1] + s.rows_out, total[2] + s.rows_rejected]
        if name.endswith(".parquet"):
            a, b = pq.read_table(out / name), pq.read_table(ref)
            assert a.equals(b) and a.schema.metadata == b.schema.metadata  # values and types unchanged
        else:
            assert (out / name).read_bytes() == ref.read_bytes()
        mine = [{k: v for k, v in r.items() if k != "file"} for r in rejects if r["file"] == name]
        assert mine == [json.loads(x) for x in (tmp_path / "ref" / f"{name}.rejects.jsonl").read_text().splitlines()]
    assert [got.rows_in, got.rows_out, got.rows_rejected] == total


def test_fail_mode_names_the_first_bad_line_and_writes_nothing(ray_local, bundle_fp32, tmp_path, monkeypatch):
    from rlpredict.serve.annotate import AnnotateError
    from rlpredict.serve.annotate_ray import annotate_path

    src = write_jsonl(tmp_path / "in.jsonl", trace_lines(600))
    with pytest.raises(AnnotateError, match=r"in\.jsonl: line 12: not valid JSON"):
        annotate_path(src, tmp_path / "out.jsonl", bundle_fp32, chunk_rows=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "a"}\n' * 500)[:-30])
    with pytest.raises(AnnotateError) as e:  # raised in a Ray task, reported as itself
        annotate_path(tmp_path / "bad.jsonl.gz", tmp_path / "out.jsonl.gz", bundle_fp32, on_error="skip")
    assert type(e.value) is AnnotateError and "\n" not in str(e.value)
    assert str(e.value).startswith(f"{tmp_path / 'bad.jsonl.gz'}: truncated or corrupt compressed file")
    # a relative path is named as given, as the local engine names it (was: made absolute)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AnnotateError, match=r"^bad\.jsonl\.gz: truncated or corrupt compressed file"):
        annotate_path(Path("bad.jsonl.gz"), Path("out.jsonl.gz"), bundle_fp32, on_error="skip")
    assert not (tmp_path / "out.jsonl.gz").exists()


def test_the_output_is_committed_after_its_rejects_file(ray_local, bundle_fp32, tmp_path, monkeypatch):
    """A single file's output says the run is complete, so it is renamed into place last: a
    rejects file that cannot be written (a full disk) leaves neither (was: the output entered
    at its first write, renamed first, and left without its rejects file)."""
    from contextlib import contextmanager

    from rlpredict.serve import annotate_ray as ar

    real = ar.atomic_path

    @contextmanager
    def full_disk_for_rejects(path):
        with real(path) as tmp:
            yield tmp
            if Path(path).name.endswith(".rejects.jsonl"):
                raise OSError(28, "No space left on device")

    monkeypatch.setattr(ar, "atomic_path", full_disk_for_rejects)
    src = write_jsonl(tmp_path / "in.jsonl", trace_lines(600))
    with pytest.raises(OSError, match="No space left"):
        ar.annotate_path(src, tmp_path / "out.jsonl", bundle_fp32, on_error="skip",
                         rejects=tmp_path / "out.rejects.jsonl", chunk_rows=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_no_row_is_an_error_as_on_the_local_engine(ray_local, bundle_fp32, tmp_path):
    from rlpredict.serve.annotate import AnnotateError
    from rlpredict.serve.annotate_ray import annotate_path

    src = write_jsonl(tmp_path / "in.jsonl", [b"", b"  "])
    with pytest.raises(AnnotateError, match=r"in\.jsonl: no rows to annotate \(the file is empty"):
        annotate_path(src, tmp_path / "out.jsonl", bundle_fp32, on_error="skip")
    folder = tmp_path / "day"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [b""])
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), folder / "b.parquet")
    with pytest.raises(AnnotateError, match=r"day: no rows to annotate in any of its 2 file\(s\)"):
        annotate_path(folder, tmp_path / "out", bundle_fp32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["day", "in.jsonl"]
    # every row rejected: an error, as on the local engine; in a folder whose other files are
    # annotated, the file is named (was: an empty output, without a word)
    bad = write_jsonl(tmp_path / "bad.jsonl", [b'{"text": "a"}', b'{"text": "b"}'])
    with pytest.raises(AnnotateError, match=r"bad\.jsonl: no row could be annotated: all 2 were rejected"):
        annotate_path(bad, tmp_path / "bad.out.jsonl", bundle_fp32, on_error="skip")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "good.jsonl", trace_lines(20))
    write_jsonl(mixed / "bad.jsonl", [b'{"text": "a"}'])
    said: list[str] = []
    got = annotate_path(mixed, tmp_path / "mixed.out", bundle_fp32, on_error="skip", log=said.append)
    assert got.all_rejected == ["bad.jsonl"] and any("every row of 1 file(s) was rejected" in m for m in said)


def test_cli_engine_ray_json_summary(ray_local, bundle_fp32, tmp_path):
    from rlpredict.cli import app

    src = write_parquet(tmp_path / "in.parquet", 800)
    args = ["annotate", str(src), "-o", str(tmp_path / "out.parquet"), "--model", str(bundle_fp32),
            "--engine", "ray", "--num-workers", "1", "--on-error", "skip", "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert (s["engine"], s["workers"], s["rows_in"]) == ("ray", 1, 800)
    assert s["rows_out"] + s["rows_rejected"] == 800 and s["rows_rejected"] == 20
    r = CliRunner().invoke(app, args)  # the output exists now
    assert r.exit_code == 2 and "--force" in r.output


def test_dataset_api(ray_local, bundle_fp32, predictor):
    from rlpredict.serve.annotate_ray import annotate_dataset

    rows = [{"id": i, "prompt": f"q {i}"} for i in range(300)] + [{"id": 300, "prompt": None}]
    ds = annotate_dataset(ray_local.data.from_items(rows), bundle_fp32, num_workers=2)
    out = sorted(ds.take_all(), key=lambda r: r["id"])
    want = predictor.predict([r["prompt"] for r in rows[:300]])
    assert [(r["rl_bucket"], r["rl_pred_tokens"], r["rl_reserve_tokens"]) for r in out[:300]] == [
        (p.bucket, p.pred_tokens, p.reserve_tokens) for p in want]
    assert all(r["rl_error"] is None for r in out[:300])
    assert out[300]["rl_bucket"] is None and "missing or null" in out[300]["rl_error"]



PIPELINE = """
import sys, ray
import pyarrow.parquet as pq
from rlpredict.serve.annotate_ray import annotate_dataset

src, out, bundle = sys.argv[1:4]
ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
for workers in (None, 4):
    dst = f"{out}/{workers}"
    annotate_dataset(ray.data.read_parquet(src), bundle, num_workers=workers).write_parquet(dst)
    t = pq.read_table(dst)
    print(workers, t.num_rows, t.column("rl_error").null_count, flush=True)
"""


def test_dataset_api_in_a_read_write_pipeline_on_few_cpus(bundle_fp32, tmp_path):
    """read_parquet -> annotate_dataset -> write_parquet on 2 CPUs, by default and with more
    workers than CPUs (was: waiting forever for actors that could not start: a pool of fixed
    size, and a default worker wanting both CPUs while a read task held one). In a process of
    its own, so that a pipeline that waits forever fails the test instead of hanging it."""
    import os
    import signal
    import subprocess
    import sys

    pytest.importorskip("ray")
    src = write_parquet(tmp_path / "in.parquet", 400)
    log, err = tmp_path / "stdout", tmp_path / "stderr"
    # Files, not pipes: Ray's daemons inherit them. Its own session: on timeout the whole
    # group (the driver and the Ray processes it started) is killed.
    with open(log, "w") as out, open(err, "w") as errors:
        proc = subprocess.Popen([sys.executable, "-c", PIPELINE, str(src), str(tmp_path / "out"), str(bundle_fp32)],
                                stdout=out, stderr=errors, start_new_session=True)
        try:
            proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail("the pipeline did not finish in 240 s")
    assert proc.returncode == 0, err.read_text()[-2000:]
    # Ray's raylet may print its own warnings to the driver's stdout on a busy machine ("8 PYTHON
    # worker processes have been started ..."): the pipeline's lines are the others
    ours = [line for line in log.read_text().split("\n") if "(raylet)" not in line]
    assert ours[:2] == ["None 400 390", "4 400 390"]  # 10 null prompts


def test_sigterm_ends_a_ray_run_as_ctrl_c_does(bundle_fp32, tmp_path):
    """ray.init replaced SIGTERM's handler: ``kill`` gave exit 15 and a C++ stack dump from
    Ray's core worker, not the CLI's one line and exit 130 (nothing written either way)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pytest.importorskip("ray")
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"question {i} " * 20}) + "\n" for i in range(20_000)))
    err = tmp_path / "stderr"
    code = "from rlpredict.cli import main; main()"
    args = ["annotate", str(src), "-o", str(tmp_path / "out.jsonl"), "--engine", "ray", "--no-progress",
            "-m", str(bundle_fp32), "--num-workers", "1", "--threads", "1"]
    with open(err, "w") as errors:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=errors,
                                start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            deadline = time.monotonic() + 120
            while "ray:" not in err.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(2)  # Ray Data is running
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    said = err.read_text()
    assert rc == 130, said[-2000:]
    assert "interrupted: no output was written" in said and "SIGTERM received" not in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "stderr"]


def test_outputs_inside_the_input_folder_and_odd_rejects_names_are_refused(bundle_fp32, tmp_path):
    """Checked before Ray starts. A rejects file on an input trace replaced it (with --force),
    and an output folder inside the input folder was read as input by the next run; a rejects
    name that is not .jsonl was taken (the local engine refuses it)."""
    from rlpredict.outputs import OutputError
    from rlpredict.serve.annotate import AnnotateError
    from rlpredict.serve.annotate_ray import annotate_path

    src = tmp_path / "in"
    src.mkdir()
    write_jsonl(src / "a.jsonl", trace_lines(5))
    before = (src / "a.jsonl").read_bytes()
    for out, rejects in ((tmp_path / "out", src / "a.jsonl"), (tmp_path / "out", src / "r.jsonl"),
                         (src / "out", None)):
        with pytest.raises(OutputError, match=r"inside the input|also an input"):
            annotate_path(src, out, bundle_fp32, on_error="skip", rejects=rejects, force=True)
    with pytest.raises(AnnotateError, match=r"give it a \.jsonl name"):
        annotate_path(src / "a.jsonl", tmp_path / "o.jsonl", bundle_fp32, on_error="skip", rejects=tmp_path / "r.txt")
    assert (src / "a.jsonl").read_bytes() == before and not (tmp_path / "out").exists()


def test_a_ray_that_fails_to_import_says_why(monkeypatch):
    import builtins

    from rlpredict.serve.annotate import AnnotateError
    from rlpredict.serve.annotate_ray import INSTALL_HINT, import_ray

    real = builtins.__import__

    def broken(name, *a, **kw):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'grpc'", name="grpc")  # Ray there, one of its imports not
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(AnnotateError) as e:
        import_ray()
    assert str(e.value) == f"{INSTALL_HINT} (importing it failed: No module named 'grpc')"

    def absent(name, *a, **kw):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'", name="ray")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", absent)
    with pytest.raises(AnnotateError) as e:
        import_ray()
    assert str(e.value) == INSTALL_HINT
