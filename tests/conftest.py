"""Test-wide rules.

A test skipped because an extra that `make setup` (and CI) installs cannot be imported is a
failure: a broken install must not pass as skipped tests (`tests/engines/conftest.py` does the
same for vLLM). Set RLPREDICT_EXTRAS_OPTIONAL=1 where extras are deliberately left out (a
partial install); pandas, which no extra declares, may always be missing.
"""

from __future__ import annotations

import os
import re

import pytest

EXTRAS_OPTIONAL = "RLPREDICT_EXTRAS_OPTIONAL"
#: The top-level modules of `make setup`'s extras ([train,engines,plot,dev,ray]) that tests
#: import with ``pytest.importorskip`` (vLLM: tests/engines/conftest.py).
INSTALLED_BY_SETUP = frozenset({"torch", "transformers", "scipy", "sklearn", "onnx", "onnxruntime", "datasets",
                                "pyarrow", "ray", "yaml", "nbclient", "matplotlib", "peft", "accelerate"})
_COULD_NOT_IMPORT = re.compile(r"could not import '([\w.]+)'")


def _missing_extra(longrepr: object) -> str | None:
    """The module of `make setup`'s extras a skip says it could not import, or None."""
    text = longrepr[-1] if isinstance(longrepr, tuple) else str(longrepr)
    m = _COULD_NOT_IMPORT.search(str(text))
    top = m.group(1).split(".")[0] if m else None
    return top if top in INSTALLED_BY_SETUP else None


def _optional() -> bool:
    return os.environ.get(EXTRAS_OPTIONAL, "0").strip().lower() in ("1", "true", "yes", "on")


def _fail(report: pytest.CollectReport | pytest.TestReport, module: str) -> None:
    report.outcome = "failed"
    report.longrepr = (f"{module} is installed by `make setup` but cannot be imported: these tests would be "
                       f"skipped on a broken install. Install it (`make setup`) or set {EXTRAS_OPTIONAL}=1.")


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """A test module skipped at import (a module-level ``importorskip``)."""
    report = yield
    if (report.skipped and isinstance(collector, pytest.Module) and not _optional()
            and (module := _missing_extra(report.longrepr))):
        _fail(report, module)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A test (or its fixture) skipped by an ``importorskip`` inside it."""
    report = yield
    if report.skipped and not _optional() and (module := _missing_extra(report.longrepr)):
        _fail(report, module)
    return report
