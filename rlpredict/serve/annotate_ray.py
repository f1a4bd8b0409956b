"""Annotate traces at cluster scale on Ray Data (``rlpredict annotate --engine ray``).

Two entry points:

- ``annotate_path(input, output, ...)``: files or folders of JSONL(.gz) / Parquet, with the
  local path's guarantees. The node that runs it (the driver) reads its inputs in chunks of
  ``chunk_rows`` rows (read tasks pinned to that node, so only it needs the files); a pool of
  actors, each holding one ``Predictor`` loaded once, annotates the chunks with the local
  path's own rules (``annotate.annotate_lines`` / ``annotate.annotate_record_batch``: one
  validation and one column rule for both engines); the driver writes the results in input
  order into a temporary file or folder that is moved into place only when every row is
  accounted for (``rlpredict.outputs``). A worker that dies is restarted and its chunk re-run by
  Ray Data; a chunk's result reaches the driver once, so no row is lost or duplicated.
- ``annotate_dataset(ds, ...)``: for a ``ray.data.Dataset`` of rows holding a prompt or
  messages: the same rows plus ``rl_bucket``, ``rl_pred_tokens``, ``rl_reserve_tokens`` and
  ``rl_error`` (null for good rows; for bad ones the reason, with null ``rl_*``).

The bundle travels to the workers through Ray's object store (its sha256s are checked again
where it lands), so ``--model`` need only exist on the driver's node. Ray is an extra
(the ``[ray]`` extra: ``pip install -c constraints.txt -e '.[ray]'`` in a checkout); nothing here imports it at module level.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlpredict.outputs import (
    atomic_path,
    check_new_dir,
    check_new_file,
    check_paths,
    mark_owned,
    naming,
    output_dir,
    resolved,
)
from rlpredict.records import COMPRESSION_ERRORS, TRACE_FIELDS, Fields, OnError, bounded_lines
from rlpredict.serve.annotate import (
    ANNOTATE_TOOL,
    CHUNK_CHARS,
    COLUMNS,
    AnnotateError,
    AnnotateSummary,
    BadRow,
    _batches,
    _open_parquet,
    _Run,
    annotate_lines,
    annotate_record_batch,
    bad_row_message,
    check_rejects_name,
    corrupt_compressed,
    default_rejects_path,
    detect_format,
    earlier_rejects,
    no_rows,
    none_annotated,
    parquet_out_schema,
    rejects_owner,
    tally_stale,
)
from rlpredict.serve.bundle import MANIFEST, Bundle, load_bundle

#: Files read at once on the driver's node (reading is cheap next to predicting; each read task
#: is a Python process).
READ_TASKS = 2
INSTALL_HINT = ("--engine ray needs Ray: install the [ray] extra (in a checkout: pip install -c constraints.txt "
                "-e '.[ray]'), or pip install 'ray[data]'")
ERROR_COLUMN = "rl_error"
DEFAULT_FIELDS = TRACE_FIELDS


def import_ray() -> Any:
    """``ray`` with Ray Data, or an ``AnnotateError`` saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as e:  # Ray itself, or one of its own imports (was: that cause hidden)
        missing = getattr(e, "name", None)
        cause = "" if missing in ("ray", "ray.data", None) else f" (importing it failed: {e})"
        raise AnnotateError(INSTALL_HINT + cause) from None
    return ray


@dataclass
class RaySummary(AnnotateSummary):
    engine: str = "ray"
    workers: int = 0
    threads_per_worker: int = 0
    files: int = 0
    skipped_csv: list[str] = field(default_factory=list)  # CSV traces in an input folder: not read
    skipped_other: list[str] = field(default_factory=list)  # files named like logs it cannot read (.jsonl.zst)
    all_rejected: list[str] = field(default_factory=list)  # files of a folder none of whose rows was annotated


# ---- the bundle, shipped to the workers ---------------------------------------------------------
def bundle_files(model: str | Path | Bundle | None) -> dict[str, bytes]:
    """A verified bundle's files by name (the manifest and what it lists)."""
    b = model if isinstance(model, Bundle) else load_bundle(model)
    names = [MANIFEST, *b.manifest["files"]]
    return {name: (b.path / name).read_bytes() for name in names}


#: A worker's copy of the bundle, in the temporary folder: ``rlpredict-bundle-<its pid>-<random>``.
COPY_PREFIX = "rlpredict-bundle-"


def _remove_stale_copies() -> None:
    """Remove the bundle copies of workers that died while loading (killed by an interrupt's
    shutdown, out of memory or a lost node, before their ``finally`` ran: was, up to 34 MB left
    in the temporary folder each time; a reviewer's find). A copy whose pid still runs, or is
    another user's, is left alone."""
    for entry in Path(tempfile.gettempdir()).glob(f"{COPY_PREFIX}*-*"):
        m = re.fullmatch(rf"{re.escape(COPY_PREFIX)}(\d+)-\w+", entry.name)
        if m is None or not entry.is_dir() or entry.is_symlink() or (
                hasattr(os, "getuid") and entry.stat().st_uid != os.getuid()):
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except (OverflowError, OSError):  # alive, or not ours to judge
            continue


class _Annotator:
    """One Ray actor: a Predictor loaded once, then chunks (``mode="chunks"``) or rows
    (``mode="rows"``) of pyarrow batches."""

    def __init__(self, bundle_ref: Any, options: dict, fields: Fields, mode: str,
                 on_error: OnError = "skip", fault: tuple[str, int] | None = None):
        import ray

        from rlpredict.serve.runtime import Predictor

        files = ray.get(bundle_ref[0])  # wrapped in a list so Ray Data does not resolve it early
        _remove_stale_copies()
        folder = Path(tempfile.mkdtemp(prefix=f"{COPY_PREFIX}{os.getpid()}-"))
        try:
            for name, data in files.items():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(data)
            self.predictor = Predictor.load(folder, **options)  # sha256s checked again here
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.fields, self.mode, self.on_error, self.fault = fields, mode, on_error, fault

    def __call__(self, batch: Any) -> Any:
        return self._chunks(batch) if self.mode == "chunks" else self._rows(batch)

    # -- files: one row of the batch is one chunk of an input file
    def _chunks(self, batch: Any) -> Any:
        import pyarrow as pa

        out: dict[str, list] = {k: [] for k in ("file", "first", "count", "last", "payload", "rejects",
                                                "rows_in", "rows_out", "rows_rejected", "rows_replaced",
                                                "rows_without_generator", "rows_without_user_text", "reasons",
                                                "stale", "progress")}
        for c in batch.to_pylist():
            self._maybe_fail(c)
            summary = AnnotateSummary(c["path"], "", None)
            rejects = io.StringIO()
            run = _Run(Path(c["path"]), self.predictor, self.fields, "skip", rejects, summary,
                       lambda _done: None, file=c["name"] or None)
            payload = b""
            if c["kind"] == "jsonl":
                text = io.StringIO()
                annotate_lines(run, enumerate(io.BytesIO(c["payload"]), c["first"]), text, c["chunk_rows"])
                data = text.getvalue().encode("utf-8")
                payload = gzip.compress(data, compresslevel=6, mtime=0) if data and c["out_gz"] else data
            elif c["count"]:
                rb = pa.ipc.open_stream(c["payload"]).read_next_batch()
                good = annotate_record_batch(run, rb, c["first"] - 1, parquet_out_schema(rb.schema))
                if good is not None:
                    sink = io.BytesIO()
                    with pa.ipc.new_stream(sink, good.schema) as w:
                        w.write_batch(good)
                    payload = sink.getvalue()
            for key, value in (("file", c["file"]), ("first", c["first"]), ("count", c["count"]),
                               ("last", c["last"]), ("payload", payload),
                               ("rejects", rejects.getvalue().encode("utf-8")),
                               ("rows_in", summary.rows_in), ("rows_out", summary.rows_out),
                               ("rows_rejected", summary.rows_rejected), ("rows_replaced", summary.rows_replaced),
                               ("rows_without_generator", summary.rows_without_generator),
                               ("rows_without_user_text", summary.rows_without_user_text),
                               ("reasons", json.dumps(dict(run.reasons))), ("stale", json.dumps(dict(run.stale))),
                               ("progress", c["progress"])):
                out[key].append(value)
        return pa.table({**out, "payload": pa.array(out["payload"], pa.large_binary()),
                         "rejects": pa.array(out["rejects"], pa.large_binary())})

    def _maybe_fail(self, chunk: dict) -> None:
        """Test hook: kill this worker process the first time it meets the chosen chunk."""
        if self.fault is None or (chunk["file"], chunk["first"]) != (0, self.fault[1]):
            return
        try:
            os.close(os.open(self.fault[0], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(1)

    # -- a user's Dataset: rows in, the same rows plus rl_* and rl_error out
    def _rows(self, batch: Any) -> Any:
        import pyarrow as pa

        f = self.fields
        used = [n for n in f.request_columns() if n in batch.column_names]
        cols = {n: batch.column(n).to_pylist() for n in used}
        run = _Run(Path("dataset"), self.predictor, f, self.on_error, None,
                   AnnotateSummary("dataset", "", None), lambda _done: None)
        ok, requests, gens = [], [], []
        errors: list[str | None] = [None] * batch.num_rows
        for i in range(batch.num_rows):
            try:
                req, gen = run.parse({n: cols[n][i] for n in used})
            except BadRow as e:
                if self.on_error == "fail":
                    raise AnnotateError(f"a dataset row: {e} (use on_error='skip' to mark bad rows)") from None
                errors[i] = str(e)
                continue
            ok.append(i)
            requests.append(req)
            gens.append(gen)
        values: list[list[int | None]] = [[None] * batch.num_rows for _ in COLUMNS]
        if ok:
            for col, arr in zip(values, run.predict(requests, gens), strict=True):
                for i, v in zip(ok, arr, strict=True):
                    col[i] = int(v)
        table = batch.drop_columns([c for c in (*COLUMNS, ERROR_COLUMN) if c in batch.column_names])
        for name, col in zip(COLUMNS, values, strict=True):
            table = table.append_column(name, pa.array(col, pa.int64()))
        return table.append_column(ERROR_COLUMN, pa.array(errors, pa.string()))


# ---- resources ----------------------------------------------------------------------------------
def plan_workers(ray: Any, num_workers: int | None, threads: int | None,
                 leave_cpu: bool = False) -> tuple[int, int]:
    """(workers, threads per worker) from the cluster's CPUs: by default workers of up to 4
    threads (at most one node's CPUs) filling the cluster; ``threads`` defaults to the CPUs
    divided among ``num_workers``. ``leave_cpu``: a worker takes at most a node's CPUs less one,
    which the Dataset's own read and write tasks need (an actor that wants a whole node never
    starts while one of them holds a CPU there, and the pipeline waits forever)."""
    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    total, biggest = int(sum(nodes)), int(max(nodes, default=0))
    if total < 1:
        raise AnnotateError("the Ray cluster has no CPUs")
    most = max(1, biggest - 1) if leave_cpu else biggest
    if threads is None:
        threads = min(most, 4) if num_workers is None else max(1, total // num_workers)
    threads = max(1, min(threads, most))
    if num_workers is None:
        num_workers = max(1, total // threads)
    return num_workers, threads


def _check_reachable(address: str | None, timeout_s: float = 5.0, option: str = "--ray-address") -> None:
    """A ``host:port`` address must accept a connection (was: Ray retried for 13 minutes,
    printing its own errors, then named another address)."""
    if not address or address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise AnnotateError(f"{option} {address!r}: expected HOST:PORT, 'auto' or ray://HOST:PORT (Ray Client: needs ray[client], not in the [ray] extra)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise AnnotateError(f"{option} {address}: cannot reach a Ray cluster there "
                            f"({e.strerror or type(e).__name__}, within {timeout_s:g} s)") from None


@contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """An initialised Ray: the running one, the cluster at ``address``, or a local one that is
    started here and shut down at the end."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    # ray.init replaces SIGTERM's handler (Python: sys.exit(15); its core worker's C++ handler
    # dumps a stack): put back what this process had (the CLI's: exit 130, one line, nothing written)
    main = threading.current_thread() is threading.main_thread()
    signals = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, n)] if main else []
    before = {sig: signal.getsignal(sig) for sig in signals}
    # no address: $RAY_ADDRESS (set by `ray job submit`), else a new local Ray, as documented
    # (was: ray.init attached to any `ray start` cluster running on this machine)
    given = "--ray-address" if address else "$RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    _check_reachable(address, option=given)
    try:
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 configure_logging=True)
    except (ConnectionError, ValueError) as e:  # in this CLI's words (were Ray's: "... `--address` flag")
        why = ("no running Ray cluster on this machine (start one with `ray start --head`, or leave the "
               "option out for a local Ray)") if address == "auto" and isinstance(e, ConnectionError) \
            else str(e).split("\n", 1)[0]
        raise AnnotateError(f"{given} {address}: {why}") from None
    for sig, handler in before.items():  # Python handlers only: with SIG_DFL, Ray's sys.exit
        if callable(handler):             # still runs the callers' finally blocks
            signal.signal(sig, handler)
    try:
        yield ray
    finally:
        ray.shutdown()


@contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """No Ray Data log lines (progress, retry advice, tracebacks) on the user's terminal while we
    run: progress is ours, and errors reach the user as one line (``_unwrapped``)."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---- a user's Dataset ---------------------------------------------------------------------------
def annotate_dataset(ds: Any, model: str | Path | None = None, *, fields: Fields = DEFAULT_FIELDS,
                     on_error: OnError = "skip", num_workers: int | None = None,
                     threads: int | None = None, reserve_quantile: float | None = None,
                     margin: float = 0.0, batch_rows: int = 1024) -> Any:
    """The rows of ``ds`` plus ``rl_bucket``, ``rl_pred_tokens``, ``rl_reserve_tokens`` (int64)
    and ``rl_error`` (see the module docstring), lazily (a ``ray.data.Dataset``). ``on_error``:
    "skip" marks bad rows in ``rl_error``; "fail" raises on the first one met. Ray must be
    initialised (``ray.init``). Order follows ``ds``'s ``preserve_order`` setting."""
    ray = import_ray()
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    workers, per_worker = plan_workers(ray, num_workers, threads, leave_cpu=True)
    options = {"reserve_quantile": reserve_quantile, "margin": margin, "threads": per_worker}
    return _annotator(ds, ray.put(bundle_files(model)), options, fields, "rows", workers, per_worker,
                      batch_rows, on_error=on_error)


def _annotator(ds: Any, bundle_ref: Any, options: dict, fields: Fields, mode: str, workers: int,
               threads: int, batch_size: int, on_error: OnError = "skip",
               fault: tuple[str, int] | None = None) -> Any:
    import ray

    # Up to ``workers`` actors, as many as the CPUs hold: a fixed-size pool waits until all of
    # them have started, forever where the cluster cannot hold them all (more workers asked for
    # than CPUs, or CPUs held by the Dataset's other tasks); an autoscaling cluster adds nodes.
    return ds.map_batches(
        _Annotator, batch_size=batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers), num_cpus=threads,
        fn_constructor_kwargs={"bundle_ref": [bundle_ref], "options": options, "fields": fields,
                               "mode": mode, "on_error": on_error, "fault": fault})


# ---- files and folders --------------------------------------------------------------------------
@dataclass(frozen=True)
class _File:
    src: Path
    dst: Path
    name: str  # relative name in a folder run, "" for a single file
    kind: str  # "jsonl" or "parquet"


#: Name parts of files a folder run names when it cannot read them (a `.jsonl.zst` month of logs).
LOG_LIKE = (".jsonl", ".ndjson", ".parquet", ".pq", ".csv", ".log", ".json")


def plan_files(input: Path, output: Path, skipped_csv: list[str] | None = None,
               skipped_other: list[str] | None = None) -> list[_File]:
    """Input file -> output file of the same format; input folder -> output folder with the
    same relative names (every .jsonl[.gz]/.ndjson[.gz]/.parquet file in it, recursively; the
    CSV traces it holds, which this engine does not read, are added to ``skipped_csv``, and
    other files named like logs (``LOG_LIKE``: another compression, say) to ``skipped_other``)."""
    def kind(p: Path) -> str:
        fmt, _ = detect_format(p)
        if fmt == "csv":
            raise AnnotateError(f"{p}: --engine ray reads JSONL(.gz) and Parquet; use --engine local for CSV")
        return fmt

    if input.is_file():
        k, out_k = kind(input), kind(output)
        if out_k != k:
            raise AnnotateError(f"{output}: output format {out_k} differs from the input's ({k}); "
                                "annotate keeps the input's format")
        return [_File(input, output, "", k)]
    if not input.is_dir():
        raise AnnotateError(f"{input}: no such file or folder")
    found = []
    for p in sorted(input.rglob("*")):
        rel = p.relative_to(input)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_symlink() and (p.is_dir() or not p.exists()):  # was: left out without a word
            if skipped_other is not None:
                skipped_other.append(f"{rel.as_posix()} (a {'link to a folder, not followed' if p.is_dir() else 'broken link'})")
            continue
        if not p.is_file():
            continue
        try:
            fmt, _ = detect_format(p)
        except AnnotateError:  # other files in the folder are not inputs; log-like ones are named
            if skipped_other is not None and any(part in p.name.lower() for part in LOG_LIKE):
                skipped_other.append(rel.as_posix())
            continue
        if fmt == "csv":
            if skipped_csv is not None:
                skipped_csv.append(rel.as_posix())  # said, not silently left out
            continue
        found.append(_File(p, output / rel, rel.as_posix(), fmt))
    if not found:
        raise AnnotateError(f"{input}: no .jsonl, .jsonl.gz or .parquet files in this folder")
    return found


def _read_chunks(batch: Any, chunk_rows: int) -> Iterator[Any]:
    """Ray task (on the driver's node): the files of ``batch`` -> chunks of raw lines (JSONL) or
    Arrow IPC record batches (Parquet), one output row per chunk. An error names each file as
    the user gave it, as the local engine does (it is read by its absolute path: the task runs
    in another folder)."""
    for f in batch.to_pylist():
        try:
            yield from _file_chunks(f, chunk_rows)
        except AnnotateError as e:
            raise AnnotateError(str(e).replace(f["path"], f["shown"], 1)) from None


def _file_chunks(f: dict, chunk_rows: int) -> Iterator[Any]:
    """``_read_chunks`` of one file."""
    import pyarrow as pa

    src = Path(f["path"])

    def chunk(first: int, count: int, payload: bytes, progress: float, last: bool = False) -> Any:
        return pa.table({"file": [f["file"]], "path": [f["shown"]], "name": [f["name"]],
                         "kind": [f["kind"]], "out_gz": [f["out_gz"]], "chunk_rows": [chunk_rows],
                         "first": [first], "count": [count], "last": [last],
                         "progress": [progress], "payload": pa.array([payload], pa.large_binary())})

    if f["kind"] == "parquet":
        pf = _open_parquet(src)
        total, done = max(1, pf.metadata.num_rows), 0
        for rb in _batches(pf, src, chunk_rows):
            sink = io.BytesIO()
            with pa.ipc.new_stream(sink, rb.schema) as w:
                w.write_batch(rb)
            yield chunk(done + 1, rb.num_rows, sink.getvalue(), (done + rb.num_rows) / total)
            done += rb.num_rows
        yield chunk(done + 1, 0, b"", 1.0, last=True)
        return
    try:
        size = max(1, src.stat().st_size)
        with open(src, "rb") as raw, (gzip.GzipFile(fileobj=raw) if f["in_gz"] else nullcontext(raw)) as r:
            lines: list[bytes] = []
            first, held = 1, 0
            for data in bounded_lines(r):  # an oversize row travels as a short marker
                lines.append(data)
                held += len(data)
                if len(lines) >= chunk_rows or held >= CHUNK_CHARS:
                    yield chunk(first, len(lines), b"".join(lines), raw.tell() / size)
                    first, lines, held = first + len(lines), [], 0
            yield chunk(first, len(lines), b"".join(lines), 1.0, last=True)
    except COMPRESSION_ERRORS as e:
        raise corrupt_compressed(src, e) from None
    except OSError as e:  # Ray rebuilds an OSError with its retry advice as the file name
        raise AnnotateError(f"{src}: cannot read ({e.strerror or e})") from None


def annotate_path(input: str | Path, output: str | Path, model: str | Path | None = None, *,
                  fields: Fields = DEFAULT_FIELDS, on_error: OnError = "fail",
                  rejects: str | Path | None = None, chunk_rows: int = 2048,
                  num_workers: int | None = None, threads: int | None = None,
                  reserve_quantile: float | None = None, margin: float = 0.0,
                  ray_address: str | None = None, progress: bool = False, force: bool = False,
                  log: Callable[[str], None] | None = None, owner: str | None = None,
                  _fault: tuple[str, int] | None = None) -> RaySummary:
    """Annotate a file or a folder of files on Ray (see the module docstring); the same output,
    rejects, checks and errors as ``annotate.annotate_file`` (``owner`` too). Uses the running Ray if there is
    one, else attaches to ``ray_address``, else starts a local Ray and shuts it down."""
    src, dst = Path(input), Path(output)
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    skipped_csv: list[str] = []
    skipped_other: list[str] = []
    files = plan_files(src, dst, skipped_csv, skipped_other)
    folder = src.is_dir()
    rej_path = Path(rejects) if rejects else default_rejects_path(dst) if on_error == "skip" else None
    check_rejects_name(rej_path)  # as the local engine (was: any name)
    outputs = [("--output", dst)] + ([("--rejects", rej_path)] if rej_path else [])
    # an output inside the input folder would be an input file, or be read as one next run (a
    # rejects file written over an input trace, with --force)
    check_paths([src, *(f.src for f in files)], outputs, apart=[src] if folder else [])
    if folder:  # never another tool's folder, even with --force (was: refused only after Ray started)
        check_new_dir(dst, force=force, option="--output", only=ANNOTATE_TOOL)
    else:
        check_new_file(dst, force=force, option="--output", owner=owner)
    if rej_path is not None:
        check_new_file(rej_path, force=force, option="--rejects",  # never a listed output (annotate.py)
                       owner=None if folder else rejects_owner(owner, rejects))
    if rej_path is not None and folder and resolved(dst) in resolved(rej_path).parents:
        raise AnnotateError(f"{rej_path}: --rejects is inside the --output folder; choose another path")
    loaded = load_bundle(model)  # a bad bundle fails before Ray starts
    check_paths([], outputs, apart=[loaded.path])  # never inside the bundle it reads
    bundle = bundle_files(loaded)
    summary = RaySummary(str(src), str(dst), str(rej_path) if rej_path else None, files=len(files),
                         skipped_csv=skipped_csv, skipped_other=skipped_other,
                         earlier_rejects=earlier_rejects(dst, on_error))
    if skipped_other and log:
        log(f"skipped {len(skipped_other)} file(s) in {src}: links to folders, broken links, or named like logs "
            f"but not .jsonl[.gz], .ndjson[.gz], .parquet or .pq ({', '.join(skipped_other[:3])}"
            f"{', ...' if len(skipped_other) > 3 else ''})")
    if skipped_csv and log:
        log(f"skipped {len(skipped_csv)} CSV file(s) in {src} ({', '.join(skipped_csv[:3])}"
            f"{', ...' if len(skipped_csv) > 3 else ''}): --engine ray reads JSONL and Parquet; "
            "annotate them with --engine local")
    t0 = time.perf_counter()
    with ray_session(ray_address) as ray, _quiet_ray_data(), ExitStack() as stack:
        workers, per_worker = plan_workers(ray, num_workers, threads)
        summary.workers, summary.threads_per_worker = workers, per_worker
        if log:
            cpus = int(ray.cluster_resources().get("CPU", 0))
            at_once = max(1, sum(int(n["Resources"].get("CPU", 0)) // per_worker  # node by node: an actor
                                 for n in ray.nodes() if n.get("Alive")))  # never spans two
            log(f"ray: {workers} worker(s) x {per_worker} thread(s) on {cpus} CPUs; {len(files)} file(s)"
                + (f" (--threads {threads} is more than a worker may take here)" if threads and per_worker < threads
                   else "")
                + (f"; at most {at_once} worker(s) run at once" if workers > at_once else ""))
        here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}  # read on this node
        # absolute: the read tasks run in the Ray worker's folder (was: a relative path of the
        # documented `--ray-address auto` command was not found there)
        items = [{"file": i, "path": str(resolved(f.src)), "shown": str(f.src), "name": f.name, "kind": f.kind,
                  "in_gz": detect_format(f.src)[1], "out_gz": detect_format(f.dst)[1]}
                 for i, f in enumerate(files)]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        # at most READ_TASKS files read at once (was: one task per file, all at once: 60 files
        # of 10 rows started 56 worker processes and took 7.7 GB)
        ds = ds.map_batches(_read_chunks, batch_size=1, batch_format="pyarrow", num_cpus=0,
                            concurrency=min(READ_TASKS, len(items)), fn_kwargs={"chunk_rows": chunk_rows},
                            label_selector=here)
        options = {"reserve_quantile": reserve_quantile, "margin": margin, "threads": per_worker}
        ds = _annotator(ds, ray.put(bundle), options, fields, "chunks", workers, per_worker, 1,
                        fault=_fault)
        ds.context.execution_options.preserve_order = True
        ds.context.target_max_block_size = 1  # one chunk per block, so chunks spread over the workers

        sizes = [f.src.stat().st_size for f in files]
        before = [0, *itertools.accumulate(sizes)][:-1]  # bytes of the files before file i
        bar = stack.enter_context(_Progress(progress, sum(sizes)))
        # entered before the rejects file, so committed after it: the output, which says the run
        # is complete, comes last (was: a single file's output entered at its first write, and
        # renamed into place first, so an interrupt could leave it without its rejects file)
        root = stack.enter_context(output_dir(dst, force=force, tool=ANNOTATE_TOOL, option="--output")) if folder \
            else None
        single = None if folder else stack.enter_context(atomic_path(dst))
        rej_file = None
        if rej_path is not None:
            rej_file = stack.enter_context(open(stack.enter_context(atomic_path(rej_path)), "wb"))
        writer = _Writers(files, root, stack, single)
        reasons: Counter[str] = Counter()
        stale: Counter[str] = Counter()
        file_out = [0] * len(files)  # rows annotated per file
        file_in = [0] * len(files)
        seen = _Ledger(files)
        blocks = stack.enter_context(_unwrapped(ray, ds.iter_batches(batch_size=None, batch_format="pyarrow")))
        for block in blocks:
            for c in block.to_pylist():
                i = c["file"]
                seen.check(c)
                if c["rows_rejected"] and on_error == "fail":
                    first = json.loads(c["rejects"].split(b"\n", 1)[0])
                    where, number = ("line", first["line"]) if "line" in first else ("row", first["row_number"])
                    raise AnnotateError(bad_row_message(files[i].src, where, number, first["reason"]))
                writer.write(i, c["payload"])
                if rej_file is not None:
                    with naming(rej_path):  # (was: an output's full disk named by the rejects file)
                        rej_file.write(c["rejects"])
                summary.rows_in += c["rows_in"]
                summary.rows_out += c["rows_out"]
                file_in[i] += c["rows_in"]
                file_out[i] += c["rows_out"]
                summary.rows_rejected += c["rows_rejected"]
                summary.rows_replaced += c["rows_replaced"]
                summary.rows_without_generator += c["rows_without_generator"]
                summary.rows_without_user_text += c["rows_without_user_text"]
                reasons.update(json.loads(c["reasons"]))
                tally_stale(stale, json.loads(c["stale"]))
                bar.update(summary.rows_in, before[i] + c["progress"] * sizes[i])
        seen.finish()
        if summary.rows_in == 0:  # as the local engine: an error, and nothing is written
            raise AnnotateError(f"{src}: no rows to annotate in any of its {len(files)} file(s)") if folder \
                else no_rows(src, files[0].kind)
        if summary.rows_out == 0:
            raise none_annotated(src, summary, reasons)
        summary.all_rejected = [f.name for f, n_in, n_out in zip(files, file_in, file_out, strict=True)
                                if n_in and not n_out]
        if summary.all_rejected and log:  # the others were annotated: said, not an error
            log(f"note: every row of {len(summary.all_rejected)} file(s) was rejected, so their outputs are "
                f"empty: {', '.join(summary.all_rejected[:3])}{', ...' if len(summary.all_rejected) > 3 else ''}")
        if summary.rows_in != summary.rows_out + summary.rows_rejected:
            raise AssertionError(f"rows in {summary.rows_in} != out {summary.rows_out} + rejected "
                                 f"{summary.rows_rejected}")
        writer.close()
        summary.reasons = dict(reasons.most_common())
        summary.stale_fields = dict(sorted(stale.items()))
    summary.seconds = time.perf_counter() - t0
    return summary


class _Ledger:
    """Checks, before anything is committed, that every file's chunks arrived once each, in
    order, from its first line (or row) to its last: no chunk lost, none twice."""

    def __init__(self, files: list[_File]):
        self.files = files
        self.current = 0  # the file whose chunks arrive now
        self.next = 1  # its first line (row) number expected next

    def check(self, c: dict) -> None:
        if (c["file"], c["first"]) != (self.current, self.next):
            raise AssertionError(f"chunk {c['file']}:{c['first']} arrived where "
                                 f"{self.current}:{self.next} was expected (a bug)")
        self.next += c["count"]
        if c["last"]:
            self.current, self.next = self.current + 1, 1

    def finish(self) -> None:
        if self.current != len(self.files):
            raise AssertionError(f"{self.files[self.current].src}: chunks missing (a bug)")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextmanager
def _unwrapped(ray: Any, it: Iterator[Any]) -> Iterator[Iterator[Any]]:
    """``it``, stopped when the caller stops (so the run ends with it), with a worker's known
    error (a corrupt input, a bad bundle) raised as itself rather than wrapped by Ray."""
    try:
        yield it
    except ray.exceptions.RayError as e:
        cause: BaseException | None = e
        while cause is not None and (isinstance(cause, ray.exceptions.RayError)
                                     or type(cause).__module__.startswith("ray.")):
            cause = getattr(cause, "cause", None) or cause.__cause__
        if isinstance(cause, OSError):
            raise cause from None
        if isinstance(cause, ValueError):  # Ray Data appends its retry advice to the message
            raise AnnotateError(str(cause).split("\n", 1)[0]) from None
        # a worker that cannot start (another environment on one node: a module missing, a
        # runtime env that fails) is the setup's, not a bug: its last line, without Ray's
        # traceback and colour codes; anything else stays a bug
        setup = tuple(getattr(ray.exceptions, n) for n in (
            "ActorDiedError", "RayActorError", "RuntimeEnvSetupError", "OutOfMemoryError", "WorkerCrashedError",
            "NodeDiedError", "ObjectLostError", "RaySystemError") if hasattr(ray.exceptions, n))
        if isinstance(e, setup) or isinstance(cause, ImportError):
            text = _ANSI.sub("", str(cause if cause is not None else e))
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            raise AnnotateError(f"a Ray worker failed: {lines[-1] if lines else type(e).__name__}") from e
        raise
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


class _Writers:
    """The driver's output files, opened in input order; JSONL payloads are appended as they
    come (a gzip member per chunk), Parquet payloads are Arrow IPC batches."""

    def __init__(self, files: list[_File], root: Path | None, stack: ExitStack, single: Path | None = None):
        self.files, self.root, self.stack, self.single = files, root, stack, single  # single: one file's temporary path
        self.current = -1
        self.out: Any = None
        self.empty = False  # the current output is a .gz that has no member yet

    def write(self, i: int, payload: bytes) -> None:
        while self.current < i:
            self._next()
        if not payload:
            return
        with naming(self.files[i].dst):  # its write errors name it (``outputs.naming``)
            if self.files[i].kind == "jsonl":
                self.out.write(payload)
                self.empty = False
            else:
                import pyarrow as pa

                self.out.write_table(pa.ipc.open_stream(payload).read_all())

    def _end(self) -> None:
        if self.out is not None:
            with naming(self.files[self.current].dst):
                if self.empty:  # an empty file is still gzip (was: an empty member first in every
                    self.out.write(gzip.compress(b"", compresslevel=6, mtime=0))  # file, which one-member readers read as all)
                self.out.close()

    def _next(self) -> None:
        self._end()
        self.current += 1
        f = self.files[self.current]
        if self.root is None:
            path = self.single if self.single is not None else self.stack.enter_context(atomic_path(f.dst))
        else:
            path = self.root / f.name
            path.parent.mkdir(parents=True, exist_ok=True)
        if f.kind == "jsonl":
            self.out = self.stack.enter_context(open(path, "wb"))  # noqa: SIM115 (the stack closes it)
            self.empty = f.dst.name.lower().endswith(".gz")
        else:
            import pyarrow.parquet as pq

            schema = parquet_out_schema(_open_parquet(f.src).schema_arrow)
            self.out = self.stack.enter_context(pq.ParquetWriter(path, schema))

    def close(self) -> None:
        while self.current < len(self.files) - 1:
            self._next()
        self._end()
        if self.root is None:
            return
        # each sub-folder records what it holds, as the output folder does: `--force` then
        # refuses a file someone added in one (was: replaced with the folder, without a word)
        children: dict[Path, set[str]] = {}
        for f in self.files:
            parts = Path(f.name).parts
            for depth in range(1, len(parts)):
                children.setdefault(Path(*parts[:depth]), set()).add(parts[depth])
        for folder, names in children.items():
            mark_owned(self.root / folder, ANNOTATE_TOOL, names)


class _Progress:
    """Rows done and rows/s on stderr: a rich bar on a terminal, else a line every 30 s."""

    def __init__(self, enabled: bool, total_bytes: int):
        self.enabled, self.total = enabled, max(1, total_bytes)
        self.t0 = self.last = time.perf_counter()
        self._bar: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("annotating on ray"), BarColumn(),
                                 TextColumn("{task.fields[rows]:,} rows, {task.fields[rate]:,.0f} rows/s"),
                                 TimeElapsedColumn(), console=Console(stderr=True))
            self._bar.__enter__()
            self._task = self._bar.add_task("", total=self.total, rows=0, rate=0.0)
        return self

    def update(self, rows: int, done_bytes: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = rows / max(now - self.t0, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, completed=done_bytes, rows=rows, rate=rate)
        elif now - self.last >= 30:
            self.last = now
            print(f"annotated {rows:,} rows ({rate:,.0f} rows/s, {100 * done_bytes / self.total:.0f}% "
                  "of the input)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
