"""The predictor bundle: a self-contained folder that a serving stack loads without torch.

A bundle holds ``model.onnx`` (inputs ``input_ids`` and ``attention_mask``, int64, dynamic batch
and sequence axes; output ``logits``), the encoder's ``tokenizer.json`` and ``manifest.json``:
the bucket scheme, the input spec, the RL tokenizer, the format version, the sha256 of every
file, and the export's parity, quantization and evaluation records. ``rlpredict stack`` adds an
optional lexical head (``lexical.npz``, ``rlpredict.serve.lexical``). Loading checks all of it
and refuses a bundle that does not match, naming the file. Only JSON, ONNX, ``tokenizer.json``
and ``.npz`` arrays (no object arrays) are read: no pickle, no remote code.

Pure Python + numpy (through ``rlpredict.buckets``): part of the base install.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rlpredict
from rlpredict.buckets import BucketScheme
from rlpredict.inputs import InputSpec
from rlpredict.json_file import read_json
from rlpredict.outputs import write_text_atomic
from rlpredict.serve.conformal import QuantileCalibration
from rlpredict.serve.lexical import LexicalHead
from rlpredict.splits import check_split_record

FORMAT = "rlpredict.bundle/1"
#: Fields a bundle must give (``rlpredict export`` writes them all; defaults would change predictions).
INPUT_FIELDS = ("mode", "max_length", "include_generator")
BUCKET_FIELDS = ("edges", "point_tokens", "reserve_tokens", "reserve_quantile", "quantiles")
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_MODEL_NAME = "rl-minilm-l6-llama3"
ENV_MODEL = "RLPREDICT_MODEL"


class BundleError(ValueError):
    """A bundle is missing, incomplete, tampered with, or of an unknown format."""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_entries(folder: str | Path, names: list[str]) -> dict[str, dict]:
    """``{name: {"sha256": ..., "bytes": ...}}`` for the given files of ``folder``."""
    folder = Path(folder)
    return {n: {"sha256": file_sha256(folder / n), "bytes": (folder / n).stat().st_size} for n in names}


def write_manifest(folder: str | Path, manifest: dict) -> dict:
    """Hash the files named in ``manifest["files"]`` (or the model and tokenizer) and write it."""
    names = sorted(manifest.get("files") or (MODEL_FILE, TOKENIZER_FILE))
    manifest = {**manifest, "format": FORMAT, "files": file_entries(folder, names)}
    write_text_atomic(Path(folder) / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def copy_files(bundle: Bundle, dst: str | Path) -> list[str]:
    """Copy the files ``bundle``'s manifest lists into ``dst`` (a tool's new bundle folder, being
    written); returns their names, for the new manifest's ``files``."""
    names = list(bundle.manifest["files"])
    for name in names:
        (Path(dst) / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(bundle.path / name, Path(dst) / name)
    return names


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk and what its manifest says."""

    path: Path
    manifest: dict
    buckets: BucketScheme
    input: InputSpec
    rl_tokenizer: str
    calibration: QuantileCalibration | None = None  # conformal quantiles (``rlpredict calibrate``)
    lexical: LexicalHead | None = None  # TF-IDF head stacked with the encoder (``rlpredict stack``)

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest["model"]["file"]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest["tokenizer"]["file"]

    @property
    def pad_token_id(self) -> int:
        return int(self.manifest["tokenizer"].get("pad_token_id", 0))

    @property
    def precision(self) -> str:
        return str(self.manifest["model"].get("precision", "fp32"))

    @property
    def name(self) -> str:
        return str(self.manifest.get("name") or self.path.name)

    def check_rl_tokenizer(self) -> None:
        """The tokenizer RL is counted in (``drift``, ``calibrate``) is there, or a BundleError
        naming the manifest, before any data is read (was: after, naming no file)."""
        from rlpredict.rl_tokenizers import tokenizer_path

        try:
            tokenizer_path(self.rl_tokenizer)
        except FileNotFoundError as e:
            raise BundleError(f"{self.path / MANIFEST}: rl_tokenizer: {e}") from None


def load_bundle(path: str | Path | None = None, *, verify: bool = True) -> Bundle:
    """Read and check a bundle (``None``: the default one). Raises ``BundleError``.

    ``verify=False`` skips the sha256 check of the files (still checks that they exist).
    """
    if path is not None and not str(path).strip():  # Path("") is the current folder: never meant
        raise BundleError("bundle path is empty: give a folder written by `rlpredict export`")
    folder = Path(path) if path is not None else default_bundle_path()
    if not folder.is_dir():
        what = "is a file, not a bundle folder" if folder.exists() else "no such folder"
        raise BundleError(f"bundle {folder}: {what}")
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"bundle {folder}: no {MANIFEST}; is this a folder written by `rlpredict export`?")
    try:
        manifest = read_json(mpath)
    except ValueError as e:
        raise BundleError(str(e)) from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath}: expected a JSON object")
    fmt = manifest.get("format")
    if fmt != FORMAT:
        raise BundleError(f"{mpath}: unknown bundle format {fmt!r}; this rlpredict "
                          f"({rlpredict.__version__}) reads {FORMAT!r}")
    try:
        model_file, tok_file, files = _check_manifest(manifest)
        scheme = _field(manifest, "buckets", dict)
        for key in BUCKET_FIELDS:  # export writes them all: a default would change predictions
            if key not in scheme:
                raise ValueError(f"buckets: missing field {key!r}")
        buckets = BucketScheme.from_dict(scheme, source="buckets")
        if (problem := confusion_problem((manifest.get("confusion") or {}).get("matrix"), buckets.n_buckets)):
            raise ValueError(f"confusion.matrix: {problem}")
        spec_d = _field(manifest, "input", dict)
        if unknown := sorted(set(spec_d) - {*INPUT_FIELDS, "truncation_side"}):
            raise ValueError(f"input: unknown field(s) {', '.join(map(repr, unknown))} "
                             f"(known: {', '.join((*INPUT_FIELDS, 'truncation_side'))})")
        for key in INPUT_FIELDS:
            if key not in spec_d:
                raise ValueError(f"input: missing field {key!r}")
        spec = InputSpec.from_dict(spec_d)
        side = manifest["input"].get("truncation_side", spec.truncation_side)
        if side != spec.truncation_side:  # derived from the mode: a different value is an edit
            raise ValueError(f"input.truncation_side: input mode {spec.mode!r} truncates on the "
                             f"{spec.truncation_side}, got {side!r}")
        rl_tok = _field(manifest, "rl_tokenizer", str)
        calibration = (QuantileCalibration.from_dict(manifest["calibration"], buckets.n_buckets)
                       if manifest.get("calibration") is not None else None)
    except KeyError as e:
        raise BundleError(f"{mpath}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise BundleError(f"{mpath}: {e}") from None
    lex = manifest.get("lexical")
    if lex is not None and not isinstance(lex, dict):
        raise BundleError(f"{mpath}: lexical: expected an object")
    roles = [("model", model_file), ("tokenizer", tok_file)]
    if lex is not None:
        roles.append(("lexical head", str(lex.get("file"))))
    for role, name in roles:
        if name not in files:
            raise BundleError(f"{mpath}: the {role} file {name!r} has no entry under 'files'")
    if unused := sorted(set(files) - {name for _, name in roles}):
        # was: the 'lexical' section deleted, its file still listed and hashed: the stacked bundle
        # served as its encoder alone, with the stacked model's calibration
        raise BundleError(f"{mpath}: files: {', '.join(map(repr, unused))} is used by no section of the "
                          "manifest (a section removed?); re-export the bundle")
    for name, entry in files.items():
        f = folder / name
        if not f.is_file():
            what = {model_file: "model file", tok_file: "tokenizer file"}.get(name, "file")
            raise BundleError(f"bundle {folder}: {what} {name} is missing")
        if verify and (f.stat().st_size != entry.get("bytes") or file_sha256(f) != entry.get("sha256")):
            # (the size too: was, a wrong recorded size loaded without a word; a reviewer's find)
            raise BundleError(f"bundle {folder}: {name} does not match the sha256 and size in {MANIFEST} "
                              "(modified or corrupted); re-export the bundle")
    n_labels = manifest["model"].get("num_labels")
    if n_labels is not None and n_labels != buckets.n_buckets:
        raise BundleError(f"{mpath}: model has {n_labels!r} outputs but the scheme {buckets.n_buckets} buckets")
    head = None
    if lex is not None:
        try:
            head = LexicalHead.load(folder, lex, buckets.n_buckets, spec)
        except ValueError as e:
            raise BundleError(f"bundle {folder}: {e}") from None
    return Bundle(path=folder, manifest=manifest, buckets=buckets, input=spec, rl_tokenizer=rl_tok,
                  calibration=calibration, lexical=head)


def _field(d: dict, key: str, kind: type, where: str = "") -> Any:
    """``d[key]``, which must be a ``kind`` (``bool`` is not an ``int`` here)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where or 'manifest'}: expected an object")
    v = d[key]
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise ValueError(f"{where}{key}: expected {kind.__name__}, got {v!r}")
    return v


def confusion_problem(matrix: Any, n_buckets: int) -> str | None:
    """What is wrong with a confusion matrix for ``n_buckets`` buckets (None: nothing, or no
    matrix): ``n_buckets`` rows of as many counts >= 0, not all 0 (was: drift's numpy "pvals <
    0", or its reference column dropped without a word)."""
    if matrix is None:
        return None
    if not (isinstance(matrix, list) and len(matrix) == n_buckets and all(
            isinstance(row, list) and len(row) == n_buckets and all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in row)
            for row in matrix)):
        return f"expected {n_buckets} x {n_buckets} counts >= 0 (one row and column per bucket)"
    return "all 0" if not any(map(any, matrix)) else None


def _check_manifest(m: dict) -> tuple[str, str, dict]:
    """The manifest's schema, beyond the bucket scheme and the input spec (checked by their
    classes): file names, hashes and sizes, pad id, label count. Returns (model, tokenizer, files)."""
    model = _field(m, "model", dict)
    tok = _field(m, "tokenizer", dict)
    model_file = _field(model, "file", str, "model.")
    tok_file = _field(tok, "file", str, "tokenizer.")
    if "pad_token_id" in tok and not 0 <= _field(tok, "pad_token_id", int, "tokenizer.") < 2**31:
        raise ValueError(f"tokenizer.pad_token_id: out of range, got {tok['pad_token_id']}")
    if model.get("num_labels") is not None and not 2 <= _field(model, "num_labels", int, "model.") <= 4096:
        raise ValueError(f"model.num_labels: expected 2 to 4096, got {model['num_labels']}")
    for key in ("name", "created_by", "created_at"):
        if m.get(key) is not None:
            _field(m, key, str)
    if model.get("precision") is not None:
        _field(model, "precision", str, "model.")
    for key in ("evaluation", "confusion", "training_split", "parity", "quantization"):
        if m.get(key) is not None:
            _field(m, key, dict)  # read by eval, drift, calibrate and stack
    for field, split in (("training_split", m.get("training_split")),
                         ("evaluation.split", (m.get("evaluation") or {}).get("split"))):
        if split is None:
            continue
        if not isinstance(split, dict):
            raise ValueError(f"{field}: expected dict, got {split!r}")
        check_split_record(split, field)  # was: a test_frac of "0.2" compared as text, a seed of 5.5 used
    files = _field(m, "files", dict)
    for name, entry in files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"file name {name!r} points outside the bundle")
        sha = _field(entry, "sha256", str, f"files.{name}.")
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ValueError(f"files.{name}.sha256: expected 64 lowercase hex digits, got {sha!r}")
        if _field(entry, "bytes", int, f"files.{name}.") < 0:
            raise ValueError(f"files.{name}.bytes: negative")
    return model_file, tok_file, files


def shipped_bundle_paths() -> list[Path]:
    """Where the shipped bundle is: the checkout's ``models/rl-minilm-l6-llama3``, or the copy
    a wheel installs in ``rlpredict/_default_model``."""
    package = Path(rlpredict.__file__).resolve().parent
    return [package.parent / "models" / DEFAULT_MODEL_NAME, package / "_default_model"]


def default_bundle_path() -> Path:
    """The bundle used without ``--model``: ``$RLPREDICT_MODEL``, the checkout's
    ``models/rl-minilm-l6-llama3``, or the copy packaged in ``rlpredict/_default_model``."""
    env = os.environ.get(ENV_MODEL)
    if env:
        p = Path(env).expanduser()
        if not (p / MANIFEST).is_file():
            raise BundleError(f"${ENV_MODEL}={env}: no bundle there (no {MANIFEST})")
        return p
    candidates = shipped_bundle_paths()
    for p in candidates:
        if (p / MANIFEST).is_file():
            return p
    raise BundleError("no default predictor bundle found (looked in "
                      + ", ".join(str(p) for p in candidates)
                      + f"); pass --model BUNDLE or set ${ENV_MODEL}")
