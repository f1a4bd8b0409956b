"""The scheduler core (policies, simulator, compare, CLI) never imports torch or training code."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
import ecoserve_sched.cli, ecoserve_sched.compare, ecoserve_sched.demo, ecoserve_sched.policies
from ecoserve_sched.cost_model import load_profile
from ecoserve_sched.request import SLO
from ecoserve_sched.simulator import run
from ecoserve_sched.trace import read_trace
tr = read_trace(sys.argv[1]).head(200)
for p in ("vllm", "ecoserve"):
    run(tr, p, load_profile("llama2-13b-a100-80gb"), slo=SLO(), predictions="oracle")
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "vllm", "sklearn")
             or m.split(".")[:2] == ["rlpredict", "train"])
assert not bad, bad
"""


def test_scheduler_core_is_torch_free() -> None:
    from ecoserve_sched.demo import SAMPLE

    r = subprocess.run([sys.executable, "-c", CODE, str(SAMPLE)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
