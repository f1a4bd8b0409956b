"""The transformers-engine tests' trace: a long GT with a large reservation, under-predicted
requests (top-ups) and late arrivals that join running decodes, on 14 KV blocks of 16 tokens:
few enough that EcoServe preempts once and vLLM four times (by recompute), SJF and S3 too. Import after ``pytest.importorskip("transformers")``."""

from __future__ import annotations

import torch

from ecoserve_sched.engines.transformers_cb import GenRequest, TransformersEngine

# (arrival step, prompt tokens, output tokens, predicted = reserved tokens, predicted bucket)
TRACE = [(0, 16, 120, 128, 3), (0, 16, 60, 64, 2), (2, 40, 18, 20, 0), (3, 8, 40, 8, 0),
         (6, 24, 10, 16, 0), (10, 12, 30, 32, 1), (14, 30, 12, 16, 0), (20, 5, 25, 24, 1)]
KV_BLOCKS, TOKEN_BUDGET, MAX_RUNNING = 14, 128, 8


def trace_requests() -> list[GenRequest]:
    """Fresh requests for TRACE (seeded random prompt ids)."""
    g = torch.Generator().manual_seed(7)
    return [GenRequest(torch.randint(3, 256, (p,), generator=g).tolist(), out, float(a),
                       pred_tokens=res, reserve_tokens=res, pred_bucket=b)
            for a, p, out, res, b in TRACE]


def make_engine(model, policy: str) -> TransformersEngine:
    """The engine on the step clock with TRACE's KV blocks, token budget and batch limit."""
    return TransformersEngine(model, policy, clock="step", kv_blocks=KV_BLOCKS,
                              token_budget=TOKEN_BUDGET, max_running=MAX_RUNNING)


def physical_blocks(sched, request_id: str) -> int:
    """Blocks transformers' cache holds for ``request_id`` (all allocators)."""
    return sum(len(a.block_table.get(request_id, [])) for a in sched.cache.cache_allocators.values())
