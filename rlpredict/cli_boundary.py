"""One error boundary for each CLI (``rlpredict`` and ``ecoserve``) and each script.

Every command runs inside ``BoundaryGroup.invoke``, every script of ``benchmarks/`` and
``training/`` inside ``run_script``:

- a known failure (bad data, bad bundle, bad option, an output that would collide, I/O errors,
  corrupt compressed files) prints one line, ``error: FILE[:LINE]: what is wrong``, and exits 2;
- anything else is a bug: one line saying so, exit 1;
- ``--debug`` (or ``RLPREDICT_DEBUG=1``; a script: the variable) re-raises, so the traceback shows;
- SIGTERM and SIGHUP are turned into ``KeyboardInterrupt`` so temporary outputs are removed as
  on Ctrl-C (exit 130, nothing half-written is left).

``--version`` prints the package version and the bundle format version. Validators for numeric
options (``positive``, ``at_least``, ``in_range``, ``thread_count``) give one message naming the
option.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import math
import os
import re
import signal
import subprocess
import sys
import threading
import typing
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from rlpredict.outputs import note_interrupt
from rlpredict.records import is_plain_number

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

DEBUG_ENV = "RLPREDICT_DEBUG"

#: Failures a user can fix: one line and exit 2. Our errors (DataError, BundleError,
#: AnnotateError, TraceError, OutputError, ...) are ValueErrors; ExportError registers itself.
KNOWN_ERRORS: list[type[BaseException]] = [ValueError, OSError, EOFError, zlib.error, MemoryError]


#: Optional modules -> the extra of ``rlpredict-ecoserve`` that installs them: a command that
#: needs a missing one says which to install (exit 2; was "internal error (a bug)").
OPTIONAL_MODULES = {
    **dict.fromkeys(("torch", "transformers", "peft", "accelerate", "datasets", "sklearn", "threadpoolctl",
                     "scipy", "onnx", "yaml", "tomli"), "train"),
    "pyarrow": "parquet", "matplotlib": "plot", "ray": "ray",
}


def install_hint(extra: str) -> str:
    """How to install an extra: the project is installed from a checkout (it is not on PyPI)."""
    return f"install the [{extra}] extra (in a checkout: pip install -c constraints.txt -e '.[{extra}]')"


def missing_module(e: BaseException) -> str | None:
    """The line for an optional module that is not installed, or not in a version we support
    (an ``ImportError`` with ``needs_extra`` set: its message says which); None: not one of
    ours to name."""
    if isinstance(e, ImportError) and getattr(e, "needs_extra", None):
        return str(e)
    if not isinstance(e, ModuleNotFoundError) or not e.name:
        return None
    top = e.name.split(".")[0]
    if e.name != top:  # a submodule: the package is there (another version, or a bug of ours)
        import importlib.util

        try:
            if importlib.util.find_spec(top) is not None:
                return None
        except (ImportError, ValueError):
            return None
    if top == "vllm":
        return "vLLM is not installed (tested with vllm 0.33.0; how to install it: docs/engines.md)"
    if top in OPTIONAL_MODULES:
        extra = OPTIONAL_MODULES[top]
        return f"this needs {top}, which is not installed: {install_hint(extra)}"
    return None


def register_known(*types: type[BaseException]) -> None:
    """Add exception types that the boundary reports as user errors (exit 2)."""
    KNOWN_ERRORS.extend(t for t in types if t not in KNOWN_ERRORS)


def describe(e: BaseException) -> str:
    """One line for a known failure."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    if isinstance(e, (EOFError, zlib.error)):
        return f"a compressed input is truncated or corrupt ({e})"
    if isinstance(e, MemoryError):
        return "out of memory"
    text = str(e).strip() or type(e).__name__
    return " ".join(text.splitlines()) if "\n" in text else text


def _debug(ctx: Any) -> bool:
    return bool(ctx.params.get("debug")) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


#: Signals that end a run as Ctrl-C does: SIGTERM (``kill``, ``timeout``, a job scheduler) and
#: SIGHUP (the terminal closed), whose default action would end it without removing anything.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        note_interrupt()  # in case a library swallows the exception (``outputs.raise_if_interrupted``)
        raise KeyboardInterrupt

    # a signal ignored at the start stays ignored (``nohup`` ignores SIGHUP; a shell's background
    # job, SIGINT)
    def unraisable(u: Any) -> None:  # the interrupt raised in a __del__: noted, not printed
        if not isinstance(u.exc_value, KeyboardInterrupt):
            previous_hook(u)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, *STOP_SIGNALS)
           if signal.getsignal(sig) is not signal.SIG_IGN}
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)
        sys.unraisablehook = previous_hook
        note_interrupt(False)


def _done() -> None:
    """The command succeeded and its outputs landed: a Ctrl-C or SIGTERM during the
    interpreter's teardown (up to a second after torch) is ignored (was: exit 130 with no
    message after a complete run, so a script took the run as failed). From ``atexit``, so
    that a process that goes on (a test calling the CLI in-process) keeps its handlers, and the
    children it starts do not inherit ignored signals."""
    global _IGNORING_AT_EXIT
    if not _IGNORING_AT_EXIT:
        _IGNORING_AT_EXIT = True
        atexit.register(_ignore_stop_signals)


_IGNORING_AT_EXIT = False


def _ignore_stop_signals() -> None:
    for sig in (signal.SIGINT, *STOP_SIGNALS):
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_IGN)


def _framework(e: BaseException) -> bool:
    """Typer/Click control flow (Exit, Abort, usage errors): left to the framework."""
    return type(e).__module__.split(".")[0] in ("typer", "click")


def failure(e: BaseException, debug_hint: str,
            interrupted: str = "interrupted: no output was written") -> tuple[int, str]:
    """The exit code and the one line for an exception that reached a boundary: an interrupt
    (130, ``interrupted``), a known failure (2) or a bug (1, with ``debug_hint``: how to see the
    traceback)."""
    if isinstance(e, KeyboardInterrupt):
        return 130, interrupted
    if isinstance(e, tuple(KNOWN_ERRORS)):
        return 2, f"error: {describe(e)}"
    if missing := missing_module(e):
        return 2, f"error: {missing}"
    return 1, (f"internal error (a bug): {type(e).__name__}: {describe(e)}; rerun with {debug_hint} "
               "for the traceback and report it")


#: click's ``UsageError`` (a bad option, argument or command) as the installed typer raises it:
#: typer 0.2x vendors click as ``typer._click``, older releases use ``click`` itself.
USAGE_ERROR: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class BoundaryGroup(TyperGroup):
    """A Typer group whose commands fail with one line, never a traceback."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _plain_flags(self, ctx)
        super().format_help(ctx, formatter)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _plain_flags(command, ctx)
            _once_each(command)
        return command

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except USAGE_ERROR as e:  # an option of the group itself (``rlpredict --bogus``)
            _usage_error(e, info_name or "")
        except BrokenPipeError:  # ``rlpredict --help | head``: as in ``invoke``
            _stdout_to_devnull()
            raise typer.Exit(141) from None
        except OSError as e:  # ``--version``/``--help`` into a full disk (was: rich's traceback)
            typer.echo(f"error: {describe(e)}", err=True)
            raise typer.Exit(2) from None

    def invoke(self, ctx: Any) -> Any:
        try:
            with _sigterm_as_interrupt():
                return super().invoke(ctx)
        except USAGE_ERROR as e:  # a command's options and arguments, or no such command
            sub = getattr(ctx, "invoked_subcommand", None)  # set once the command is known
            _usage_error(e, f"{ctx.command_path} {sub}" if sub else ctx.command_path)
        except BrokenPipeError:  # the reader left (``| head``): stop quietly, as a shell tool does
            _stdout_to_devnull()
            raise typer.Exit(141) from None
        except (KeyboardInterrupt, Exception) as e:
            if _framework(e) or _debug(ctx):
                raise
            code, line = failure(e, "--debug")
            if code == 130 and sys.stderr.isatty():  # off a progress bar's line (was: glued to it)
                line = "\n" + line
            typer.echo(line, err=True)
            raise typer.Exit(code) from None


def _usage_error(e: Any, path: str) -> NoReturn:
    """A bad option, argument or command: one line, ``error: COMMAND: what is wrong (see
    'COMMAND --help')``, exit 2 (was: typer's usage text and a box around the message, which
    wraps a long one over several lines). ``path``: the command, where the error does not say."""
    if type(e).__name__ == "NoArgsIsHelpError":  # the bare command (``rlpredict``): its help on stdout, exit 2
        typer.echo(e.format_message())
        raise typer.Exit(e.exit_code)
    path = e.ctx.command_path if e.ctx is not None else path
    what = " ".join(e.format_message().split())
    # typer checks a choice through pydantic, whose "Value error, " prefix is dropped (only there)
    what = re.sub(r"^(Invalid value for '[^']*': )Value error, ", r"\1", what)
    hint = f" (see '{path} --help')" if path and "(see " not in what else ""  # one pointer, not two
    typer.echo(f"error: {path + ': ' if path else ''}{what}{hint}", err=True)
    raise typer.Exit(e.exit_code)


def _plain_flags(command: Any, ctx: Any) -> None:
    """No metavar on flags in ``--help`` (typer 0.29 shows ``--force <bool>``, which reads as if
    it took a value: ``--force true`` is then an unexpected extra argument; ``--help`` itself
    too, which click adds in ``get_params``), and ``<path>`` on a repeatable option (not
    ``<list[Path]>``)."""
    for param in command.get_params(ctx) if hasattr(command, "get_params") else ():
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        elif getattr(param, "multiple", False) and param.metavar is None:  # was: <list[Path]>
            param.metavar = "<path>"  # (every repeatable option of both CLIs takes files)
        _plain_number_type(param)


def _once_each(command: Any) -> None:
    """An option that takes one value, given twice, is refused naming it (was: click kept the
    last one, silently: ``compare --out r1 --out r2`` wrote only ``r2``, ``simulate --policy vllm
    --policy sjf`` ran ``sjf``). Repeatable options (``--data``) and counters are not checked."""
    if getattr(command, "once_each", False) or not hasattr(command, "make_parser"):
        return
    parse = command.parse_args

    def parse_args(ctx: Any, args: list[str]) -> Any:
        _, _, order = command.make_parser(ctx).parse_args(args=list(args))
        seen: set[str] = set()
        for param in order:
            if getattr(param, "param_type_name", "") != "option" or param.multiple or param.count or param.is_eager:
                continue  # (eager: ``--help --help`` shows the help)
            if param.name in seen:
                raise USAGE_ERROR(f"{'/'.join([*param.opts, *param.secondary_opts])} is given more than once; give it once", ctx=ctx)
            seen.add(param.name)
        return parse(ctx, args)

    command.parse_args, command.once_each = parse_args, True


def _plain_number_type(param: Any) -> None:
    """A number option takes plain ASCII digits only (``records.is_plain_number``), as the
    scripts' ``arg_number`` and the data readers do (was: ``--rate-scale 1_0`` read as 10 and
    ``--target 0_9`` as 9, as Python's ``int`` and ``float`` read them)."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None or getattr(param, "plain_numbers", False):
        return
    kinds = {descriptor.annotation, *typing.get_args(descriptor.annotation)}
    if not kinds & {int, float}:
        return
    what = "a number" if float in kinds else "a whole number"
    process = param.process_value

    def plain(ctx: Any, value: Any) -> Any:
        for v in value if isinstance(value, list | tuple) else (value,):
            if isinstance(v, str) and not is_plain_number(v):
                raise typer.BadParameter(f"{v!r} is not {what} in plain digits", ctx=ctx, param=param)
        return process(ctx, value)

    param.process_value, param.plain_numbers = plain, True


def _stdout_to_devnull() -> None:
    """After the reader of stdout left: later writes, and the flush at exit, go nowhere."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _stdout_is_devnull() -> bool:
    try:
        return os.path.samestat(os.fstat(sys.stdout.fileno()), os.stat(os.devnull))
    except (OSError, ValueError, AttributeError):
        return False


class StdoutClosed(ValueError):
    """Output was written to a standard output the command was started with closed."""


class _ClosedStdout(io.TextIOBase):
    """Standard output when the command was started with it closed: writing is an error."""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if s:
            raise StdoutClosed("standard output is closed: what this command prints there is lost "
                               "(files it writes were written as usual)")
        return 0


class _NamedStdout:
    """Standard output whose write errors name it (a full disk behind ``> file`` said
    "[Errno 28] No space left on device" and no file); a reader that left stays a
    ``BrokenPipeError``."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, s: str) -> int:
        try:
            return self._stream.write(s)
        except OSError as e:
            raise _named(e) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            raise _named(e) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _LenientStderr:
    """Standard error whose write errors are dropped: a note or progress line that cannot be
    written (a full disk behind ``2> log``) must not stop the work, nor hide its results on
    stdout and in files (was: the first note's ENOSPC ended ``simulate`` with exit 1 and nothing
    written). The exit code still says how the command ended."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, s: str) -> int:
        try:
            return self._stream.write(s)
        except (OSError, ValueError):  # (ValueError: written after it was closed)
            return len(s)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _lenient_stderr() -> None:
    if sys.stderr is not None and not isinstance(sys.stderr, _LenientStderr):
        sys.stderr = _LenientStderr(sys.stderr)


def _named(e: OSError) -> OSError:
    if isinstance(e, BrokenPipeError) or e.filename is not None or not e.strerror:
        return e
    return OSError(e.errno, e.strerror, "standard output")


def run_cli(app: typer.Typer, **kwargs: Any) -> None:
    """A CLI's entry point: ``app(**kwargs)``, except that a reader that left (``| head``)
    ends it quietly with exit 141, as a shell tool. Commands' own writes (and ``--help``'s) are caught in
    ``BoundaryGroup``; rich (tables) catches its own, points stdout at the
    null device and exits 1, which is told apart here by that stdout."""
    if sys.stdout is None:  # fd 1 closed (`cmd >&-`): every print vanished, with exit 0
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # so no file opened later becomes fd 1
        sys.stdout = _ClosedStdout()  # a command that writes results there fails, one that does not runs
    elif not isinstance(sys.stdout, _NamedStdout):
        sys.stdout = _NamedStdout(sys.stdout)
    _lenient_stderr()
    was_null = _stdout_is_devnull()
    try:
        app(**kwargs)
    except StdoutClosed as e:  # written outside a command (--help): one line, as inside one
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except SystemExit as e:
        if e.code == 1 and not was_null and _stdout_is_devnull():
            raise SystemExit(141) from None
        if not e.code:
            _done()
        raise


def run_script(main: Callable[[], Any]) -> NoReturn:
    """The same boundary for a script (``benchmarks/``, ``training/``): an int ``main()``
    returns is the exit code (anything else: 0); a failure prints one line and exits as in
    ``failure``, and so does ``sys.exit("message")`` (exit 2); argparse's usage errors exit 2
    as usual. A script may have written some of its files when interrupted (each whole).
    ``RLPREDICT_DEBUG=1`` shows the traceback instead."""
    _lenient_stderr()
    try:
        with _sigterm_as_interrupt():
            result = main()
        code = result if isinstance(result, int) else 0
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        code, line = 2, f"error: {' '.join(e.code.split())}"
        print(line, file=sys.stderr, flush=True)
    except BrokenPipeError:  # the reader left (``| head``): stop quietly, as a shell tool does
        _stdout_to_devnull()
        code = 141
    except (KeyboardInterrupt, Exception) as e:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        code, line = failure(e, f"{DEBUG_ENV}=1", "interrupted: no file was left half-written")
        print(line, file=sys.stderr, flush=True)
    if not code:
        _done()
    sys.exit(code)


@contextlib.contextmanager
def child_process(cmd: list[str], **popen_kw: Any) -> Iterator[subprocess.Popen]:
    """A script's child process (``subprocess.Popen(cmd, **popen_kw)``) that ends with the
    script: if the block fails or is interrupted, the child gets SIGTERM, so that its own
    ``run_script`` removes what it half-wrote (SIGKILL after 30 s)."""
    proc = subprocess.Popen(cmd, **popen_kw)
    try:
        yield proc
    except BaseException:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise


def _quiet_worker(init: Callable[..., Any] | None, *args: Any) -> None:
    """A ``worker_pool`` worker's start: Ctrl-C, SIGTERM and SIGHUP (sent to the whole process
    group, as a terminal or ``timeout`` sends them) are left to the main process, whose death
    ends the worker; then ``init(*args)``."""
    for sig in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent()
    if init is not None:
        init(*args)


def _die_with_parent() -> None:
    """Exit this worker once the process that made it dies, however it dies (was: a ``SIGKILL``
    of the main process left its workers, which ignore the stop signals, waiting forever; a
    reviewer's find). A daemon thread waits on multiprocessing's parent sentinel, which every
    start method (fork, spawn, forkserver) gives and which follows the process, not the thread
    that started the worker (was: the kernel's parent-death signal, which follows the starting
    thread and which a forkserver's workers could not use), and checks each second that the
    worker was not handed to another parent (under fork, a process a worker forks holds its
    siblings' sentinels open). Limit: a worker inside one long call that holds the GIL exits
    when that call returns."""
    import multiprocessing
    import threading
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:  # not a multiprocessing child: nothing to watch
        return
    ppid = os.getppid()

    def watch(sentinel: int) -> None:
        while not wait([sentinel], timeout=1.0):  # ready once the parent is gone (already gone: at once)
            if os.getppid() != ppid:
                break
        os._exit(1)

    threading.Thread(target=watch, args=(parent.sentinel,), name="die-with-parent", daemon=True).start()


@contextlib.contextmanager
def worker_pool(workers: int, initializer: Callable[..., Any] | None = None,
                initargs: tuple = ()) -> Iterator[ProcessPoolExecutor]:
    """A script's process pool for work that only computes (the main process writes every
    file): no worker prints a traceback on Ctrl-C or SIGTERM, and if the block fails or is
    interrupted the workers are killed at once rather than left to finish their running tasks.
    (Imported here: the CLIs, which share this module, start without multiprocessing.)"""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    before = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(workers, initializer=_quiet_worker, initargs=(initializer, *initargs))
    try:
        yield pool
    except BaseException:
        for proc in set(multiprocessing.active_children()) - before:
            proc.kill()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def child_failed(what: str, returncode: int, stderr: str) -> NoReturn:
    """Fail as a child (run under ``run_script``) failed: its last stderr line, prefixed with
    ``what``, as this script's bug (exit 1), interrupt (130) or error (2)."""
    last = (stderr.strip().splitlines() or [f"exit {returncode}"])[-1]
    if returncode == 130:
        raise KeyboardInterrupt
    if returncode == 1:
        raise RuntimeError(f"{what}: {last}")
    raise SystemExit(f"{what}: {last.removeprefix('error: ')}")


# ---- argparse types for the scripts (a bad value: argparse's usage line naming the option) -------
class ScriptParser(argparse.ArgumentParser):
    """A script's argument parser: argparse's, but an option that takes one value, given
    twice, is refused naming it, as the two CLIs refuse it (was: the last one kept without a
    word). Options that add up (``append``, ``count``) are not checked."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._given: set[str] = set()
        for name, base in ((None, argparse._StoreAction), ("store", argparse._StoreAction),
                           ("store_true", argparse._StoreTrueAction), ("store_false", argparse._StoreFalseAction),
                           ("store_const", argparse._StoreConstAction)):
            self.register("action", name, _once(base))

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._given = set()
        return super().parse_known_args(args, namespace)


def _once(base: type[argparse.Action]) -> type[argparse.Action]:
    class Once(base):  # type: ignore[valid-type, misc]
        def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
            given = getattr(parser, "_given", None)
            if given is not None and self.option_strings:
                if self.dest in given:
                    parser.error(f"{'/'.join(self.option_strings)} is given more than once; give it once")
                given.add(self.dest)
            super().__call__(parser, namespace, values, option_string)

    return Once


def arg_number(kind: Callable[[str], Any] = int, low: float | None = None, high: float | None = None,
               *, low_open: bool = False) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind`` (int or float), finite, within [low, high] ((low, high]
    with ``low_open``; a missing bound is open)."""

    def parse(text: str) -> Any:
        try:
            if kind in (int, float) and not is_plain_number(text):  # was: "0_5" read as 5, "٣" as 3
                raise ValueError(text)
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
            lo = "-inf" if low is None else f"{low:g}"
            hi = "inf" if high is None else f"{high:g}"
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open or low is None else '['}{lo}, {hi}"
                                             f"{')' if high is None else ']'}, got {text}")
        return value

    return parse


def arg_path(text: str) -> Path:
    """An argparse ``type`` for a path: a blank one (an unset variable: ``--data "$LOGS"``) is
    refused, as the CLIs refuse it (``Path("")`` is the current folder, whose files were read)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path (an unset variable?)")
    return Path(text)


def arg_file(text: str) -> Path:
    """``arg_path`` for a file output: one that ends in a path separator names a folder (was:
    ``--json out/`` wrote a file named ``out``)."""
    from rlpredict.outputs import names_a_folder

    path = arg_path(text)
    if names_a_folder(text):
        raise argparse.ArgumentTypeError(f"{text!r} ends in '/', a folder; give a file name")
    return path


#: The Azure 2023 conversation trace under the shared data folder: the scripts' default trace.
SHARED_AZURE_CONV = "azure_llm_2023_conv/azure_llm_2023_conv.csv.gz"


def add_shared_input(ap: argparse.ArgumentParser, option: str, relative: str,
                     what: str) -> Callable[[argparse.Namespace], None]:
    """Options ``--shared DIR`` (the shared data folder) and ``option PATH`` (``what``), for a
    script whose input defaults to ``relative`` under that folder. Returns the function that sets
    ``option``'s value in the parsed arguments: the path given, else ``relative`` under
    ``--shared``; with neither, a usage error (exit 2) naming both. The shared data is read only
    where it is named (a default folder beside the checkout read data the user never gave)."""
    ap.add_argument("--shared", type=arg_path, metavar="DIR",
                    help=f"the shared data folder, for its {relative}, the default {option}")
    dest = ap.add_argument(option, type=arg_path, help=f"{what} (default: {relative} under --shared)").dest

    def resolve(args: argparse.Namespace) -> None:
        if args.shared is not None and not args.shared.is_dir():  # (was: "--shared/README.md/...: no such trace file")
            ap.error(f"--shared: {args.shared} is not a folder (the shared data folder)")
        if getattr(args, dest) is not None:
            return
        if args.shared is None:
            ap.error(f"give {option} PATH, or --shared DIR (the shared data folder) "
                     f"for its {relative}")
        setattr(args, dest, args.shared / relative)

    return resolve


def add_trace_input(ap: argparse.ArgumentParser) -> Callable[[argparse.Namespace], None]:
    """``add_shared_input`` for ``--trace``, the Azure 2023 conversation trace by default."""
    return add_shared_input(ap, "--trace", SHARED_AZURE_CONV, "trace to replay")


def distinct_args(ap: argparse.ArgumentParser, option: str, paths: Any) -> None:
    """A script's ``distinct_paths``: a repeatable path option given a file twice (or a hard link
    to it, or a path inside a folder also given) is a usage error, exit 2 (its rows counted twice)."""
    from rlpredict.outputs import repeated_input

    if problem := repeated_input(paths or ()):
        ap.error(f"{option}: {problem}")


def arg_list(item: Callable[[str], Any]) -> Callable[[str], list]:
    """An argparse ``type``: comma-separated ``item``s, at least one, none empty or given twice
    (was: an empty one dropped, a repeated one run twice)."""

    def parse(text: str) -> list:
        parts = [t.strip() for t in text.split(",")]
        if not any(parts):
            raise argparse.ArgumentTypeError("expected a comma-separated list, got nothing")
        if not all(parts):
            raise argparse.ArgumentTypeError(f"an empty item in {text!r}")
        values = [item(t) for t in parts]
        for i, v in enumerate(values):
            if v in values[:i]:
                raise argparse.ArgumentTypeError(f"{parts[i]!r} is given twice in {text!r}")
        return values

    return parse


#: Both CLIs' rich stderr. Text from a user (a prompt, a file name, a row's field) goes
#: into its lines through ``escape``: a '[' there is not markup. Lines never wrap (rich takes a
#: piped stderr as 80 columns).
err = Console(stderr=True, soft_wrap=True)


def log_line(message: str) -> None:
    """A progress line of a library function's ``log`` callback, dimmed, on stderr."""
    err.print(f"[dim]{escape(message)}[/dim]", highlight=False)


def say_skipped(examples: list[str]) -> None:
    """Each skipped row's line (``data.skipped_line``) on stderr, after the counts."""
    from rlpredict.data import skipped_line

    for e in examples:
        err.print(f"  [yellow]{escape(skipped_line(e))}[/yellow]", highlight=False)


def version_text(tool: str) -> str:
    import rlpredict
    from rlpredict.serve.bundle import FORMAT

    return f"{tool} {rlpredict.__version__} (bundle format {FORMAT})"


def root_callback(tool: str) -> Callable[..., None]:
    """The group callback that adds ``--version`` and ``--debug`` to a CLI."""

    def show_version(value: bool) -> None:
        if value:
            typer.echo(version_text(tool))
            raise typer.Exit()

    def callback(
        version: bool = typer.Option(False, "--version", is_eager=True, callback=show_version,
                                     help="Print the version and the bundle format, then exit."),
        debug: bool = typer.Option(False, "--debug", help=f"Show tracebacks (also ${DEBUG_ENV}=1)."),
    ) -> None:
        pass

    return callback


# ---- option validators (one message naming the option) -----------------------------------------
def distinct_paths(value: Any) -> Any:
    """A callback refusing a file or folder given twice in a repeatable option, or inside a
    folder also given (``outputs.repeated_input``), and, in an option typed ``list[str]``, a
    blank one (``nonblank_path``; as a ``Path`` it was the current folder). None passes."""
    from rlpredict.outputs import repeated_input

    for v in value or ():
        if isinstance(v, str):
            nonblank_path("a file or folder")(v)
    if problem := repeated_input(value or ()):
        raise typer.BadParameter(problem)
    return value


def nonblank_path(what: str) -> Callable[[str | None], str | None]:
    """A callback for a path option typed ``str``: a blank value (an unset ``$VAR``) is refused;
    as a ``Path`` it was the current folder."""

    def check(value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise typer.BadParameter(f"empty: give {what}")
        return value

    return check


def positive(value: Any) -> Any:
    """A callback refusing anything but a finite number > 0 (None passes)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a finite number > 0, got {value}")
    return value


def at_least(low: float) -> Callable[[Any], Any]:
    """A callback refusing values below ``low`` (None passes) and non-finite floats."""

    def check(value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, float) and not math.isfinite(value):
            raise typer.BadParameter(f"must be a finite number, got {value}")
        if value < low:
            raise typer.BadParameter(f"must be >= {low:g}, got {value}")
        return value

    return check


def in_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[Any], Any]:
    """A callback refusing values outside [low, high] (open at an end with ``low_open``,
    ``high_open``)."""

    def check(value: Any) -> Any:
        if value is None:
            return value
        if (not math.isfinite(value) or value > high or value < low or (low_open and value == low)
                or (high_open and value == high)):
            raise typer.BadParameter(f"must be in {'(' if low_open else '['}{low:g}, {high:g}"
                                     f"{')' if high_open else ']'}, got {value}")
        return value

    return check


def thread_count(value: int | None) -> int | None:
    """``--threads``: 1 to the usable cores."""
    if value is None:
        return value
    from rlpredict.serve.runtime import usable_cores  # the runtime's own cap (lazy: onnxruntime)

    cores = usable_cores()
    if not 1 <= value <= cores:
        raise typer.BadParameter(f"must be between 1 and {cores} (this machine's usable cores), got {value}")
    return value
