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


# ---- the model must take what the bundle feeds it (checked at load, not at the first prediction)
def _swap_model(path, width, names=("input_ids", "attention_mask"), weights=None):
    """Replace ``model.onnx`` with a tiny model of ``width`` outputs and these inputs (its logits:
    the mean id times ``weights``); rehashed, as ``write_manifest`` would, so only the load-time
    check can catch it."""
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    ins = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in names]
    weights = np.linspace(-1, 1, width) if weights is None else np.asarray(weights)
    w = numpy_helper.from_array(weights.astype(np.float32).reshape(1, width), "W")
    nodes = [helper.make_node("Cast", [names[0]], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["f"], ["m"], axes=[1], keepdims=1),
             helper.make_node("MatMul", ["m", "W"], ["logits"])]
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", width])
    model = helper.make_model(helper.make_graph(nodes, "g", ins, [out], [w]),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path / "model.onnx")
    _rehash(path, "model.onnx", drop_io=True)


def _rehash(path, name, drop_io=False):
    m = json.loads((path / "manifest.json").read_text())
    m["files"].update(bundle_mod.file_entries(path, [name]))
    if drop_io:
        m["model"].pop("inputs", None)
        m["model"].pop("output", None)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("width", [1, 5, 12])
def test_a_model_of_another_width_is_refused_at_load(copy, width):
    """Was: width 1 loaded and predicted bucket 0 for everything; others failed at the first
    prediction with numpy's broadcast error, naming no file."""
    _swap_model(copy, width)
    with pytest.raises(BundleError, match=rf"model.onnx: the model gives outputs of shape \({width},\) per prompt, "
                                          r"but the bundle's scheme has 10 buckets \(expected \(10,\)\)"):
        Predictor.load(copy)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_model_with_non_finite_logits_is_refused_at_load(copy, bad):
    """Was: loaded, then numpy's RuntimeWarning and "probs: each row must be finite" at the first
    prompt, naming no file; a prompt's non-finite logits after the load are named too."""
    import numpy as np

    _swap_model(copy, 10, weights=[0.0] * 9 + [bad])
    with pytest.raises(BundleError, match=r"model.onnx: the model gives non-finite logits on a probe of 2 tokens"):
        Predictor.load(copy)
    _swap_model(copy, 10)
    p = Predictor.load(copy)
    with pytest.raises(BundleError, match=r"model.onnx: the model gave non-finite logits for prompt 2 of 2"):
        p.from_logits(np.array([[0.0] * 10, [0.0] * 9 + [bad]]))


def test_a_model_with_other_inputs_is_refused_at_load(copy):
    _swap_model(copy, 10, names=("ids", "mask"))
    with pytest.raises(BundleError, match=r"model.onnx: inputs \['ids', 'mask'\]; a bundle's model takes"):
        Predictor.load(copy)


def test_a_tokenizer_of_another_model_is_refused_at_load(copy):
    """Was an 'internal error (a bug)' from ONNX Runtime's Gather at the first prediction."""
    from rlpredict.rl_tokenizers import tokenizer_path

    try:
        other = tokenizer_path("llama3")  # 128k ids: far past the tiny model's embedding
    except FileNotFoundError:
        pytest.skip("the llama3 tokenizer package is not installed")
    shutil.copy(other, copy / "tokenizer.json")
    _rehash(copy, "tokenizer.json")
    with pytest.raises(BundleError, match=r"model.onnx: the model does not take the largest token id "
                                          r"of tokenizer.json, \d+: past its embedding \(another model's tokenizer"):
        Predictor.load(copy)


def test_a_max_length_past_the_models_positions_is_refused_at_load(copy):
    """Was: short prompts passed, the first long one was an internal error."""
    m = json.loads((copy / "manifest.json").read_text())
    m["input"]["max_length"] = 1024  # the tiny model has 128 positions
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"the model does not take input.max_length = 1024 tokens"):
        Predictor.load(copy)


# ---- fields export always writes are required: a default would change predictions silently
@pytest.mark.parametrize(("edit", "match"), [
    (lambda m: m["input"].pop("include_generator"), r"input: missing field 'include_generator'"),
    (lambda m: m["input"].pop("mode"), r"input: missing field 'mode'"),
    (lambda m: m["input"].update(max_lenght=64), r"input: unknown field\(s\) 'max_lenght'"),
    (lambda m: m["buckets"].pop("quantiles"), r"buckets: missing field 'quantiles'"),
    (lambda m: m["buckets"].pop("reserve_quantile"), r"buckets: missing field 'reserve_quantile'"),
    (lambda m: m.update(buckets=None), r"buckets: expected dict"),
    (lambda m: m["buckets"]["edges"].__setitem__(-1, 4096), r"buckets: bucket edges .* the last one inf"),
    (lambda m: m.update(confusion="garbage"), r"confusion: expected dict"),
    (lambda m: m.update(evaluation=5), r"evaluation: expected dict"),
    (lambda m: m.update(name=["x"]), r"name: expected str"),
    (lambda m: m["model"].update(precision=8), r"model.precision: expected str"),
    # the recorded split and the confusion counts (were: "0.2" compared as text, drift's "pvals < 0")
    (lambda m: m.update(training_split={"test_frac": "0.2"}), r"training_split.test_frac: must be a number in \(0, 1\)"),
    (lambda m: m.update(training_split={"seed": 5.5}), r"training_split.seed: must be a whole number"),
    (lambda m: m.update(training_split={"rule": 5}), r"training_split.rule: must be one of id, copies"),
    (lambda m: m.update(training_split={"train_rows_sha256": 5}), r"training_split.train_rows_sha256: must be 64"),
    (lambda m: m.update(evaluation={"split": {"test_frac": 5}}), r"evaluation.split.test_frac: must be a number"),
    (lambda m: m.update(confusion={"matrix": [[-5, 1], [1, 1]]}), r"confusion.matrix: expected \d+ x \d+ counts >= 0"),
    (lambda m: m.update(confusion={"matrix": "x"}), r"confusion.matrix: expected \d+ x \d+ counts"),
    (lambda m: m.update(confusion={"matrix": [[1]]}), r"confusion.matrix: expected \d+ x \d+ counts"),
    # each bucket's figures lie in its range (were: loaded and served, the edit showing up later)
    (lambda m: m["buckets"]["point_tokens"].reverse(), r"buckets: point_tokens\[0\]: 1377 is outside bucket 0's range \(0, 32\]"),
    (lambda m: m["buckets"].update(reserve_tokens=[1] * 10), r"buckets: reserve_tokens\[1\]: 1 is outside bucket 1's range \(32, 64\]"),
    (lambda m: m["buckets"].update(edges=[*(2 * e for e in m["buckets"]["edges"][:-1]), None]),
     r"buckets: point_tokens\[1\]: 48 is outside bucket 1's range \(64, 128\]"),
    (lambda m: m["buckets"]["quantiles"][2].__setitem__(-1, 5000.0), r"buckets: quantiles\[2\]: .*5000 is outside bucket 2's"),
    # one entry short (was: numpy's "operands could not be broadcast together")
    (lambda m: m["buckets"]["quantile_grid"].pop(), r"buckets: quantile_grid differs from this version's grid"),
])
def test_manifest_fields_are_checked_at_load(copy, edit, match):
    """Were: defaults (a prediction changed from 37 to 51 tokens without a word), or an
    AttributeError / broadcast error in drift and calibrate after the data was read."""
    m = json.loads((copy / "manifest.json").read_text())
    edit(m)
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=rf"manifest.json: {match}"):
        load_bundle(copy)


def test_a_listed_file_no_section_uses_is_refused(tmp_path):
    """Was: the stacked bundle's 'lexical' section deleted (its file still listed and hashed)
    served as the encoder alone, with the stacked model's calibration."""
    dst = tmp_path / "bundle"
    shutil.copytree(default_bundle_path(), dst)
    m = json.loads((dst / "manifest.json").read_text())
    assert "lexical.npz" in m["files"]
    del m["lexical"]
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"manifest.json: files: 'lexical.npz' is used by no section"):
        load_bundle(dst)


def test_calibration_levels_out_of_order_are_refused():
    """Were sorted while their offset rows were not: q0.5 got q0.9's offsets."""
    from rlpredict.serve.conformal import FORMAT, QuantileCalibration

    d = {"format": FORMAT, "quantiles": [0.9, 0.5], "log_offsets": [[0.2] * 3, [0.1] * 3],
         "global_log_offsets": [0.2, 0.1], "group_n": [0, 0, 0]}
    with pytest.raises(ValueError, match=r"calibration.quantiles: expected increasing levels"):
        QuantileCalibration.from_dict(d, 3)
    d.update(quantiles=[0.5, 0.9], log_offsets=[[0.1] * 3, [0.2] * 3], global_log_offsets=[0.1, 0.2])
    assert QuantileCalibration.from_dict(d, 3).quantiles == (0.5, 0.9)


def test_blank_model_option_is_refused_not_read_as_the_current_folder(bundle_fp32, monkeypatch):
    from typer.testing import CliRunner

    from rlpredict.cli import app

    monkeypatch.chdir(bundle_fp32)  # a bundle in the current folder: "" used to load it
    res = CliRunner().invoke(app, ["predict", "-m", "", "hello"])
    assert res.exit_code == 2 and "empty: give a bundle folder" in res.output


def test_an_unknown_rl_tokenizer_is_named_before_the_data_is_read(copy, tmp_path):
    from rlpredict.serve.drift import drift_report

    _edit_manifest(copy, rl_tokenizer="nosuch")
    with pytest.raises(BundleError, match=r"manifest.json: rl_tokenizer: RL tokenizer 'nosuch'"):
        drift_report(copy, [tmp_path / "not-read.jsonl"])
