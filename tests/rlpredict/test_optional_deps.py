"""A command that needs an optional dependency the install lacks says which extra to install
(exit 2), as the base install or one extra alone would meet it; it was "internal error (a bug)"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rlpredict.cli_boundary import failure

SAMPLE = str(Path(__file__).resolve().parents[2] / "ecoserve_sched" / "samples" / "azure_conv_sharegpt.jsonl.gz")


@pytest.mark.parametrize(("name", "extra"), [("torch", "train"), ("sklearn", "train"), ("onnx", "train"),
                                             ("pyarrow", "parquet"), ("matplotlib", "plot"),
                                             ("ray", "ray")])
def test_a_missing_optional_module_names_its_extra(name, extra):
    code, line = failure(ModuleNotFoundError(f"No module named {name!r}", name=name), "--debug")
    assert code == 2 and line == (f"error: this needs {name.split('.')[0]}, which is not installed: "
                                  f"install the [{extra}] extra (in a checkout: pip install -c constraints.txt -e '.[{extra}]')")


def test_a_missing_submodule_of_an_installed_package_is_a_bug_not_a_missing_extra():
    """transformers of another version, or a typo in our own import: the package is there."""
    code, line = failure(ModuleNotFoundError("No module named 'numpy.nowhere'", name="numpy.nowhere"), "--debug")
    assert code == 1 and line.startswith("internal error (a bug)")


def test_an_unsupported_transformers_names_the_range_and_the_extra():
    """The transformers engine under a transformers without its continuous-batching API (the
    base install allows 4.46): was transformers' own ImportError, an "internal error (a bug)"."""
    code = ("import sys; sys.modules['transformers.generation.continuous_batching.scheduler'] = None\n"
            "try:\n    import ecoserve_sched.engines.transformers_cb\n"
            "except ImportError as e:\n    from rlpredict.cli_boundary import failure; print(*failure(e, '--debug'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    out = r.stdout.strip()
    assert out.startswith("2 error: ecoserve_sched.engines.transformers_cb needs transformers>=5.24,<5.25, found "), r
    assert out.endswith("install the engines extra: pip install -c constraints.txt -e '.[engines]'")


def test_a_missing_module_of_our_own_is_still_a_bug():
    code, line = failure(ModuleNotFoundError("No module named 'rlpredict.gone'", name="rlpredict.gone"), "--debug")
    assert code == 1 and line.startswith("internal error (a bug)")


def _run_without(module: str, cli: str, args: list[str]) -> subprocess.CompletedProcess:
    code = (f"import sys; sys.modules[{module!r}] = None\n"  # as if not installed
            f"from {cli} import main; sys.argv = ['x', *{args!r}]; main()")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_train_without_torch(tmp_path):
    data = tmp_path / "logs.jsonl"
    data.write_text('{"prompt": "hi", "response": "hello"}\n')
    r = _run_without("torch", "rlpredict.cli", ["train", "--data", str(data), "--out", str(tmp_path / "out")])
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("error: this needs torch, which is not installed: "
                                                 "install the [train] extra (in a checkout: pip install -c constraints.txt -e '.[train]')")
    assert not (tmp_path / "out").exists()


def test_the_real_vllm_policy_without_vllm(tmp_path):
    r = _run_without("vllm", "ecoserve_sched.cli", ["simulate", "--trace", SAMPLE, "--policy", "vllm-real"])
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: vLLM is not installed")


def test_the_vllm_setup_check_without_vllm():
    """``python -m ecoserve_sched.engines.vllm_scheduler`` printed a traceback without vLLM."""
    code = ("import runpy, sys; sys.modules['vllm'] = None\n"
            "runpy.run_module('ecoserve_sched.engines.vllm_scheduler', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: vLLM is not installed"), r.stderr
