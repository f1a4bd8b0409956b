"""Output safety: the one rule every writer of both CLIs follows.

1. **Atomic.** A file is written to a temporary file beside its target and renamed over it at
   the end; a folder is built in a temporary folder beside its target and moved into place at
   the end. A crash, Ctrl-C or SIGTERM leaves the old output or the new one, never half of one,
   and removes the temporary file or folder.
2. **No collisions.** ``check_paths`` refuses an output that is an input, is another output, or
   is a folder holding an input (replacing it would delete the input).
3. **No silent replacement.** An output that exists is replaced only with ``force``; a folder
   only if everything in it was written by this tool (``OWNER_FILE`` lists the files each tool
   wrote; a sub-folder it lists may carry its own), so ``--force`` never deletes a user's file,
   nor another run's output saved inside.

Pure standard library: both packages import it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

#: Written into every folder a tool creates: ``{"tool": ..., "files": [...]}``.
OWNER_FILE = ".rlpredict-output.json"


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: The process's umask, read once at import (reading it means setting it): temporary files and
#: folders are created private (0600, 0700) and get the modes a plain ``open``/``mkdir`` would.
_UMASK = _read_umask()


class OutputError(ValueError):
    """An output would collide with an input or another output, or would replace what the tool
    did not write."""


# ---- files --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _parent_made(path: Path) -> Iterator[None]:
    """Create ``path``'s missing parent folders; if the block fails, remove those it created
    (while they are empty): a failed write leaves no trace."""
    made = [a for a in reversed(path.parents) if not a.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


#: Set by the CLIs' signal handler (``cli_boundary``) as it raises ``KeyboardInterrupt``, and
#: cleared when the command ends: a library may swallow that exception (one raised inside a
#: ``__del__`` is only printed), so every commit below, and long loops, check this too.
_INTERRUPTED = threading.Event()


def note_interrupt(on: bool = True) -> None:
    """Record (``on``) or forget an interrupt; see ``raise_if_interrupted``."""
    (_INTERRUPTED.set if on else _INTERRUPTED.clear)()


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if an interrupt came that something swallowed."""
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt


#: Errors of a full disk or quota: the output's, whatever file the library names (shutil's copy
#: names its source: a reviewer's full disk was blamed on the shipped bundle it copied from).
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


#: How libraries written in Rust (safetensors; tokenizers, whose errors are bare ``Exception``)
#: carry the OS error of a write: as text ("... (os error 28)").
_LIBRARY_OS_ERROR = re.compile(r"\(os error (\d+)\)")
#: torch.save's zip writer says a failed write without its cause ("unexpected pos ...").
_TORCH_WRITE_ERROR = re.compile(r"inline_container\.cc|PytorchStreamWriter failed")


def _os_error(e: BaseException) -> OSError | None:
    """``e`` if an ``OSError``; a library's error caused by one (a full disk while weights, a
    tokenizer or a checkpoint are written: was an internal error, exit 1) as an ``OSError``;
    else None."""
    if isinstance(e, OSError):
        return e
    text = str(e)
    library = type(e).__module__.partition(".")[0]
    if (type(e) is Exception or library in ("safetensors", "tokenizers")) and (m := _LIBRARY_OS_ERROR.search(text)):
        code = int(m.group(1))
        return OSError(code, os.strerror(code))
    if isinstance(e, RuntimeError) and _TORCH_WRITE_ERROR.search(text):
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        return OSError(errno.EIO, f"torch could not write a file ({first[:200]}); is the disk full?")
    return None


def _disk_of(path: str | Path, err: OSError) -> str:
    """Where an error of a full disk that names no file most likely is: ``path``'s disk, or
    the temporary folder's where that is another file system with less room (libraries write
    there: onnxruntime's quantizer; was: ``export --int8`` blamed ``--out`` for a full
    ``$TMPDIR``)."""
    if err.errno not in _DISK_FULL:
        return str(path)
    tmp = Path(tempfile.gettempdir())
    try:
        here = next(p for p in (Path(path), *Path(path).absolute().parents) if p.exists())
        if os.stat(here).st_dev != os.stat(tmp).st_dev and shutil.disk_usage(tmp).free < shutil.disk_usage(here).free:
            return f"{tmp} (the temporary folder)"
    except (OSError, StopIteration):
        pass
    return str(path)


@contextlib.contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Name ``path`` in an ``OSError`` (or a library's error caused by one) raised inside that
    names no file (a write's: a full disk said "[Errno 28] No space left on device" alone) or
    that is a full disk's, unless an inner ``naming`` (the output written) already named one:
    writes to ``path`` go inside. A full disk that names no file names the temporary folder
    instead where that is the fuller disk (``_disk_of``)."""
    try:
        yield
    except Exception as e:
        err = _os_error(e)
        if err is None or getattr(err, "names_output", False) or not err.strerror or \
                (err.filename is not None and err.errno not in _DISK_FULL):
            raise
        named = OSError(err.errno, err.strerror, str(path) if err.filename is not None else _disk_of(path, err))
        named.names_output = True  # type: ignore[attr-defined]
        raise named from None


#: The most bytes of a target's name kept in its temporary file's or folder's name
#: (``.NAME.XXXXXXXX.part`` is 15 bytes longer than NAME: a legal name of 241-255 bytes made an
#: illegal temporary one, and a long ``calibrate`` failed at its last step naming that file).
_TEMP_NAME_BYTES = 200


def _temp_prefix(name: str) -> str:
    """The prefix of a temporary name beside ``name``: a dot and at most ``_TEMP_NAME_BYTES``
    bytes of it (cut at a character)."""
    raw = os.fsencode(name)
    if len(raw) > _TEMP_NAME_BYTES:
        name = raw[:_TEMP_NAME_BYTES].decode("utf-8", "ignore") or "output"
    return f".{name}."


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed to ``path``, else removed
    (with the parent folders it created)."""
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"{target}: is a folder; give a file name")
    with _parent_made(target):
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target.name), suffix=".part", dir=target.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            with naming(target):
                tmp_path.chmod(0o666 & ~_UMASK)
                yield tmp_path
                raise_if_interrupted()
                os.replace(tmp_path, target)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# ---- collisions ---------------------------------------------------------------------------------
def resolved(p: str | Path) -> Path:
    """``p`` with its links followed, as ``Path.resolve`` gives it, but never raising: a link
    that points to itself, directly or through others, is followed as far as it goes (was:
    Python's "Symlink loop" ``RuntimeError``, an internal error from every command given one;
    reading it then fails, in one line)."""
    return Path(os.path.realpath(Path(p).expanduser()))


def _key(p: Path) -> Path:
    return resolved(p)


def _same(a: Path, b: Path) -> bool:
    if _key(a) == _key(b):
        return True
    try:  # hard links, bind mounts
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_paths(inputs: Iterable[str | Path], outputs: Iterable[tuple[str, str | Path]], *,
                apart: Iterable[str | Path] = ()) -> None:
    """Refuse outputs that collide. ``outputs`` are ``(option name, path)`` pairs.

    Raises ``OutputError`` naming the option when an output is an input, equals another
    output, is a folder that holds an input, or lies inside one of the input folders ``apart``
    (a bundle written into the model or bundle it is made from).
    """
    ins = [Path(p) for p in inputs]
    outs = [(name, Path(p)) for name, p in outputs]
    for i, (name, out) in enumerate(outs):
        for folder in apart:
            if Path(folder).is_dir() and _key(Path(folder)) in _key(out).parents:
                raise OutputError(f"{out}: {name} lies inside the input {folder}; choose a path outside it")
        for src in ins:
            if _same(out, src):
                raise OutputError(f"{out}: {name} is also an input; choose another path")
            if _key(out) in _key(src).parents:
                raise OutputError(f"{out}: {name} holds the input {src}; replacing it would delete "
                                  "the input; choose another path")
        for other_name, other in outs[i + 1:]:
            if _same(out, other):
                raise OutputError(f"{out}: {name} and {other_name} are the same path; choose two")


def repeated_input(paths: Iterable[str | Path]) -> str | None:
    """Why reading ``paths`` would read some rows twice (a file or folder given twice, a hard
    link to one given, a path inside a folder also given, which is read with everything under
    it), or None."""
    seen: dict[Path, str | Path] = {}
    files: dict[tuple[int, int], str | Path] = {}  # (device, inode): a hard link is the same file
    for p in paths:
        key = resolved(p)
        if key in seen:
            return f"{p} is given twice (its rows would count twice)"
        seen[key] = p
        with contextlib.suppress(OSError):
            st = os.stat(key)
            if not key.is_dir() and (st.st_dev, st.st_ino) in files:
                return f"{p} is the same file as {files[st.st_dev, st.st_ino]} (a hard link; its rows would count twice)"
            files[st.st_dev, st.st_ino] = p
    for key, p in seen.items():
        if (outer := next((seen[a] for a in key.parents if a in seen), None)) is not None:
            return f"{p} is inside {outer}, also given, which is read with everything under it (its rows would count twice)"
    from rlpredict.records import data_files  # (lazy: records reads data, this module writes it)

    for key, p in seen.items():  # a folder's files: a link in it to a file also given
        if key.is_dir():
            for f, problem in data_files(key):
                with contextlib.suppress(OSError):
                    st = os.stat(f)
                    if problem is None and (st.st_dev, st.st_ino) in files and files[st.st_dev, st.st_ino] != p:
                        return (f"{f} (in {p}) is the same file as {files[st.st_dev, st.st_ino]}, also given "
                                "(a link; its rows would count twice)")
    return None


def check_parent(path: str | Path, option: str) -> None:
    """Refuse an output whose folder cannot be created or written (checked before the work, so
    a long run does not fail at its last step): its nearest existing ancestor must be a
    writable folder."""
    check_names(path, option)
    p = Path(path).expanduser().absolute()
    for anc in p.parents:
        if anc.is_symlink() and not anc.exists():  # was: walked past, then "File exists" after the work
            raise OutputError(f"{p}: {option}'s folder {anc} is a link to nothing (broken, or a loop); "
                              "choose another path")
        if anc.exists():
            if not anc.is_dir():
                raise OutputError(f"{p}: {option}'s parent {anc} is a file, not a folder; choose another path")
            if not os.access(anc, os.W_OK | os.X_OK):
                raise OutputError(f"{p}: {option}: the folder {anc} is not writable; choose another path")
            return


def check_names(path: str | Path, option: str) -> None:
    """Refuse an output path that is blank (an unset ``$VAR`` with a space beside it: was, a
    folder named " " made in the current folder) or with a name longer than its file system
    takes (checked before the work: was, a long ``calibrate`` measured its grid, then failed
    writing)."""
    if not str(path).strip():
        raise OutputError(f"{option} is blank ({str(path)!r}): give a path")
    p = Path(os.path.abspath(os.path.expanduser(path)))
    folder = p.parent
    while not os.path.isdir(folder) and folder != folder.parent:  # (False for a name too long)
        folder = folder.parent
    try:
        longest = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255
    if too_long := next((q for q in p.relative_to(folder).parts if len(os.fsencode(q)) > longest), None):
        raise OutputError(f"{p}: {option}: the name {too_long[:40]}... is {len(os.fsencode(too_long))} bytes "
                          f"long, more than this file system takes ({longest}); choose a shorter one")


def names_a_folder(path: str | Path) -> bool:
    """A path given as text that ends in a path separator: a folder to be, not a file (``Path``
    drops the slash, so a file output is checked as the option's text)."""
    return isinstance(path, str) and path.endswith(("/", os.sep))


def check_new_file(path: str | Path, *, force: bool, option: str, owner: str | None = None) -> None:
    """Refuse a file output that exists (unless ``force``), that is a folder (or, given as the
    option's text, ends in a path separator), that a tool of ours other than ``owner`` (the
    tool this file is written for, if any) listed in its folder's record, or whose folder
    cannot be written (``check_parent``)."""
    check_names(path, option)
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{p}: {option} is a folder; give a file name")
    if names_a_folder(path):  # (was: written as a file of that name)
        raise OutputError(f"{path}: {option} ends in '/', a folder; give a file name")
    tool, owned = _record(p.parent)
    if p.name == OWNER_FILE or (p.name in owned and (owner is None or tool != owner)):  # was: taken with
        # --force, then lost to that tool's rerun
        raise OutputError(f"{p}: {option} is {tool or 'another run'}'s output (listed in {p.parent / OWNER_FILE}), "
                          "which a rerun of it replaces; choose a path outside that folder")
    if p.exists() and not p.is_file():  # was: a FIFO or a device (/dev/stdout) replaced with --force
        raise OutputError(f"{p}: {option} is not a regular file (a FIFO, a device or a socket); give a file name")
    if (p.exists() or p.is_symlink()) and not force:  # a dangling link is the user's too
        raise OutputError(f"{p}: exists; pass --force to replace it ({option})")
    check_parent(p, option)


# ---- folders ------------------------------------------------------------------------------------
#: Sub-folders another tool writes into a tool's output folder as part of it, replaced with it:
#: a trained model's evaluation (``rlpredict eval``'s default ``MODEL/eval``, which ``export``
#: reads). Only a real folder of that name whose own record names that tool (was: the model's
#: record listed ``eval``, so a user's folder made there later, or a link, was replaced too).
PARTS: dict[str, dict[str, str]] = {"rlpredict train": {"eval": "rlpredict eval"}}


def foreign_entries(folder: Path) -> list[Path]:
    """What in ``folder`` the run that wrote it did not write (empty: the folder may be
    replaced): files its ``OWNER_FILE`` does not list, and sub-folders that are another run's
    output (their own ``OWNER_FILE``, not listed here nor one of ``PARTS``: was counted as ours,
    so ``--force`` on a folder deleted a separate run saved inside it)."""
    tool, owned = _record(folder)
    parts = PARTS.get(tool, {}) if tool else {}
    foreign = []
    for entry in sorted(folder.iterdir()):
        if entry.name == OWNER_FILE and owned:
            continue
        if entry.name in parts:  # by its own record alone (was: also by this folder's listing, which
            # an earlier version wrote: a user's folder made there later was taken; a reviewer's find)
            ours = entry.is_dir() and not entry.is_symlink() and written_by(entry) == parts[entry.name]
            foreign += foreign_entries(entry) if ours else [entry]
        elif entry.is_dir() and not entry.is_symlink() and (entry / OWNER_FILE).is_file():
            foreign += foreign_entries(entry) if entry.name in owned else [entry]
        elif entry.name not in owned:
            foreign.append(entry)
    return foreign


def check_new_dir(path: str | Path, *, force: bool, option: str, rerun: str | None = None,
                  only: str | None = None) -> None:
    """Refuse a folder output that exists (unless ``force``, or unless the tool ``rerun`` wrote
    all of it: a script's earlier run), that is a file, or that holds anything no tool of ours
    wrote. ``only``: a tool that replaces only its own folders, never another tool's (a trained
    model, a simulator run), even with ``force``. The refusal names the tool that wrote it."""
    check_names(path, option)
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{p}: {option} is a file, not a folder; choose another path")
    if p.is_symlink() and not p.exists():  # was: the whole run, then "Not a directory" at the end
        raise OutputError(f"{p}: {option} is a link to nothing (broken, or a loop); choose another path")
    here = Path.cwd()
    if Path(os.path.abspath(p)) in (here, *here.parents):  # "." or "": it would be built inside itself
        raise OutputError(f"{p}: {option} is the current folder or holds it; give a new folder's name")
    check_parent(p, option)
    if not p.exists() or not any(p.iterdir()):
        return
    owner = written_by(p)
    if only is not None and owner not in (None, only):  # was: --force replaced a trained model with a report
        raise _other_tools(p, option, owner, only, f" ({only} replaces only its own, even with --force)")
    _refuse_foreign(p, option)  # first: --force would not help (was: advised, then refused)
    if not force and not (rerun and _tools(p) == {rerun}):
        whose = f"; it is {owner}'s output" if owner else ""  # was: not said
        raise OutputError(f"{p}: exists; pass --force to replace it ({option}{whose})")


def _other_tools(folder: Path, option: str, others: str, tool: str, why: str = "") -> OutputError:
    """The refusal of ``folder``, the output of the tool(s) ``others``, as ``tool``'s output."""
    return OutputError(f"{folder}: {option} is {others}'s output folder, not {tool}'s{why}; choose another path, "
                       "or move or delete that folder yourself")


def _tools(folder: Path) -> set[str | None]:
    """The tools named by ``folder``'s ``OWNER_FILE`` and by those of its sub-folders that carry
    their own (the ones ``foreign_entries`` counts as ours)."""
    tools = {written_by(folder)}
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink() and (entry / OWNER_FILE).is_file():
            tools |= _tools(entry)
    return tools


def written_by(folder: Path) -> str | None:
    """The tool named in ``folder``'s ``OWNER_FILE``, if it has a readable one."""
    return _record(folder)[0]


def listed_by(path: Path) -> str | None:
    """The tool whose record, in ``path``'s folder, lists ``path`` as its output (None if none)."""
    tool, owned = _record(path.parent)
    return tool if path.name in owned else None


def _record(folder: Path) -> tuple[str | None, set[str]]:
    """``folder``'s ``OWNER_FILE``: the tool it names and the files it lists (None and an empty
    set where it is missing or unreadable)."""
    try:
        record = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
        files = record.get("files", [])
        tool = record.get("tool")
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return None, set()
    owned = {f for f in files if isinstance(f, str)} if isinstance(files, list) else set()
    return (tool if isinstance(tool, str) else None), owned


def _refuse_foreign(folder: Path, option: str) -> None:
    """Refuse a folder output that holds anything no tool of ours wrote (``foreign_entries``)."""
    if foreign := foreign_entries(folder):
        shown = ", ".join(str(f) for f in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise OutputError(f"{folder}: holds files no tool of ours wrote, or another run's output ({shown}); "
                          f"{option} replaces or adds to only a folder one run of a tool of ours wrote: "
                          "move them or choose another path")


def plain_modes(folder: str | Path) -> None:
    """Give everything under ``folder`` the modes a plain write would (the umask's): libraries
    save some files private (safetensors writes ``model.safetensors`` 0600)."""
    for root, dirs, files in os.walk(folder):  # links are left alone (chmod would follow them)
        for name, mode in [*((d, 0o777) for d in dirs), *((f, 0o666) for f in files)]:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, mode & ~_UMASK)


@contextlib.contextmanager
def output_dir(path: str | Path, *, force: bool, tool: str, option: str = "--out",
               rerun: bool = False, only_own: bool = True) -> Iterator[Path]:
    """Build a folder output: yield an empty temporary folder beside ``path``; on success it
    gets ``OWNER_FILE`` and replaces ``path`` (checked by ``check_new_dir``; ``rerun``: a
    folder ``tool`` wrote is replaced without ``force``; ``only_own``, the default: another
    tool's folder is never replaced, not even with ``force``: a trained model is not lost to a
    report or a bundle given its path); on any error or interrupt it is removed and ``path`` is left as it
    was. A link to a folder is followed: the link stays."""
    out = Path(path)
    if out.is_symlink() and out.is_dir():
        out = out.resolve()
    own = tool if rerun else None
    only = tool if only_own else None
    check_new_dir(out, force=force, option=option, rerun=own, only=only)
    with _parent_made(out):
        try:
            tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out.name), suffix=".part", dir=out.parent))
            tmp.chmod(0o777 & ~_UMASK)
        except OSError as e:
            raise OutputError(f"{out}: cannot create {option} there ({e.strerror})") from None
        try:
            with naming(out):
                yield tmp
                plain_modes(tmp)
                files = sorted(e.name for e in tmp.iterdir())
                write_text_atomic(tmp / OWNER_FILE, json.dumps({"tool": tool, "files": files}, indent=1) + "\n")
                raise_if_interrupted()
                _replace_dir(tmp, out, force=force, option=option, rerun=own, only=only)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            inside = _inside(e.filename, tmp)
            if inside is None:
                raise
            # a file of the temporary folder, which is gone: named as the output's (was: a full
            # disk named ``.OUT.x1y2.part/report.json``)
            named = OSError(e.errno, e.strerror, str(out / inside))
            named.names_output = True  # type: ignore[attr-defined]
            raise named from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _inside(filename: object, folder: Path) -> Path | None:
    """``filename`` relative to ``folder`` if it lies inside it (the folder itself: ``.``)."""
    if not isinstance(filename, str | os.PathLike):
        return None
    try:
        return Path(filename).relative_to(folder)
    except ValueError:
        return None


def _replace_dir(tmp: Path, out: Path, *, force: bool, option: str, rerun: str | None, only: str | None) -> None:
    """Move ``tmp`` to ``out``; an existing ``out`` (re-checked now) is moved aside first and
    removed only once the new folder is in place."""
    if not out.exists():
        os.replace(tmp, out)
        return
    check_new_dir(out, force=force, option=option, rerun=rerun, only=only)  # it may have changed while we worked
    if not any(out.iterdir()):
        out.rmdir()
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=_temp_prefix(out.name), suffix=".old", dir=out.parent))
    old.rmdir()
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    try:
        shutil.rmtree(old)
    except OSError as e:  # (was: ignored, a hidden copy of the old folder left behind each run)
        with contextlib.suppress(OSError, ValueError):
            print(f"note: {out} was replaced; its old contents, moved to {old}, could not all be removed "
                  f"({e.strerror or e}): delete that folder yourself", file=sys.stderr, flush=True)


def mark_owned(folder: str | Path, tool: str, names: Iterable[str]) -> None:
    """Record files a tool wrote into an existing folder (for writers that add to a folder
    file by file, like reports)."""
    f = Path(folder)
    marker = f / OWNER_FILE
    files = _record(f)[1]
    write_text_atomic(marker, json.dumps({"tool": tool, "files": sorted(files | set(names))}, indent=1) + "\n")


# ---- scripts (benchmarks/, training/) -----------------------------------------------------------
def check_file_output(path: str | Path, *, force: bool, option: str, inputs: Iterable[str | Path] = (),
                      apart: Iterable[str | Path | None] = ()) -> Path:
    """A script's file output, checked before its work: not one of ``inputs`` nor inside one of
    the input folders ``apart`` (None: not given), and an existing file only with ``force``
    (``check_new_file``). Write it with ``write_text_atomic``."""
    check_paths(inputs, [(option, path)], apart=[a for a in apart if a is not None])
    check_new_file(path, force=force, option=option)
    return Path(path)


def work_folder(path: str | Path, *, tool: str, option: str) -> Path:
    """A folder the script ``tool`` adds its files to, run after run (``write_owned``), checked
    before the work: new, empty, or written by ``tool`` alone; refused if it is a file, holds
    anything no tool of ours wrote, or is another tool's. The first write creates it."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{p}: {option} is a file, not a folder; choose another path")
    if p.is_symlink() and not p.exists():  # was: the work, then "File exists" at the first write
        raise OutputError(f"{p}: {option} is a link to nothing (broken, or a loop); choose another path")
    check_parent(p, option)
    if p.is_dir() and any(p.iterdir()):
        _refuse_foreign(p, option)
        if (tools := _tools(p)) != {tool}:  # another tool's, or one nested in it: the rule of ``check_new_dir``
            raise _other_tools(p, option, ", ".join(sorted(str(t) for t in tools - {tool})), tool)
    return p


def write_owned(folder: str | Path, name: str, data: str | bytes, *, tool: str) -> Path:
    """Write ``folder/name`` atomically and record it as ``tool``'s (``mark_owned``)."""
    path = Path(folder) / name
    if isinstance(data, bytes):
        write_bytes_atomic(path, data)
    else:
        write_text_atomic(path, data)
    mark_owned(folder, tool, [name])
    return path
