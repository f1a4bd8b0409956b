"""Bundle loading refuses tampered, incomplete or unknown bundles, naming the file."""

from __future__ import annotations

import json
import shutil

import pytest

from rlpredict.serve import bundle as bundle_mod
from rlpredict.serve.bundle import BundleError, default_bundle_path, load_bundle
from rlpredict.serve.runtime import Predictor


@pytest.fixture
def copy(bundle_fp32, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(bundle_fp32, dst)
    return dst


def _edit_manifest(path, **changes):
    m = json.loads((path / "manifest.json").read_text())
    m.update(changes)
    (path / "manifest.json").write_text(json.dumps(m))


def test_loads_and_exposes_the_scheme(bundle_fp32):
    b = load_bundle(bundle_fp32)
    assert b.buckets.n_buckets == 10
    assert b.input.mode == "history" and b.input.max_length == 48
    assert b.model_path.name == "model.onnx" and b.tokenizer_path.name == "tokenizer.json"
    assert set(b.manifest["files"]) == {"model.onnx", "tokenizer.json"}


@pytest.mark.parametrize("name", ["model.onnx", "tokenizer.json"])
def test_tampered_file_is_refused(copy, name):
    with open(copy / name, "ab") as f:
        f.write(b" ")
    with pytest.raises(BundleError, match=rf"{name} does not match the sha256"):
        load_bundle(copy)
    with pytest.raises(BundleError, match=name):
        Predictor.load(copy)
    load_bundle(copy, verify=False)  # an explicit opt-out still loads


def test_missing_tokenizer_is_refused(copy):
    (copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer file tokenizer.json is missing"):
        load_bundle(copy)
    with pytest.raises(BundleError, match=r"tokenizer file tokenizer.json is missing"):
        load_bundle(copy, verify=False)


def test_tokenizer_not_listed_is_refused(copy):
    m = json.loads((copy / "manifest.json").read_text())
    del m["files"]["tokenizer.json"]
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"tokenizer file 'tokenizer.json' has no entry"):
        load_bundle(copy)


def test_unknown_format_version_is_refused(copy):
    _edit_manifest(copy, format="rlpredict.bundle/99")
    with pytest.raises(BundleError, match=r"unknown bundle format 'rlpredict.bundle/99'"):
        load_bundle(copy)


def test_missing_or_broken_manifest(copy, tmp_path):
    with pytest.raises(BundleError, match=r"no manifest.json"):
        load_bundle(tmp_path)
    (copy / "manifest.json").write_text('{"format": \n')
    with pytest.raises(BundleError, match=r"manifest.json: line \d+: not valid JSON"):
        load_bundle(copy)
    with pytest.raises(BundleError, match=r"no such folder"):
        load_bundle(tmp_path / "nowhere")
    with pytest.raises(BundleError, match=r"is a file, not a bundle folder"):
        load_bundle(copy / "manifest.json")


def test_path_escaping_the_bundle_is_refused(copy):
    m = json.loads((copy / "manifest.json").read_text())
    m["files"]["../outside"] = {"sha256": "0"}
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"outside the bundle"):
        load_bundle(copy)


def test_default_bundle_from_env(bundle_fp32, tmp_path, monkeypatch):
    monkeypatch.setenv("RLPREDICT_MODEL", str(bundle_fp32))
    assert default_bundle_path() == bundle_fp32
    assert Predictor.load().bundle.path == bundle_fp32
    monkeypatch.setenv("RLPREDICT_MODEL", str(tmp_path))
    with pytest.raises(BundleError, match=r"RLPREDICT_MODEL"):
        default_bundle_path()


def test_no_default_bundle_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("RLPREDICT_MODEL", raising=False)
    monkeypatch.setattr(bundle_mod, "DEFAULT_MODEL_NAME", "no-such-model")
    if (bundle_mod.Path(bundle_mod.rlpredict.__file__).parent / "_default_model").exists():
        pytest.skip("a packaged default model is installed")
    with pytest.raises(BundleError, match=r"no default predictor bundle found.*--model"):
        default_bundle_path()


@pytest.mark.parametrize("path", ["", "  "])
def test_an_empty_bundle_path_is_refused_not_read_as_the_current_folder(path):
    with pytest.raises(BundleError, match=r"bundle path is empty"):
        load_bundle(path)
