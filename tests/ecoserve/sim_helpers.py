"""Test doubles for the scheduler tests: a transparent cost model and a request builder."""

from __future__ import annotations

from ecoserve_sched.request import SLO, Request


class FlatCost:
    """Test double of CostModel: every iteration takes ``iter_s`` (+1 ms per 1k prefill tokens)."""

    name = "flat-test"

    def __init__(self, blocks: int = 64, token_budget: int = 2048, iter_s: float = 0.01) -> None:
        self.blocks = blocks
        self.token_budget = token_budget
        self.iter_s = iter_s

    def kv_blocks(self, block_size: int) -> int:
        return self.blocks

    def iteration_time(self, prefill_tokens: int, prefill_ctx_tokens: int, decode_requests: int,
                       decode_ctx_tokens: int) -> float:
        if prefill_tokens <= 0 and decode_requests <= 0:
            return 0.0
        return self.iter_s + 1e-6 * prefill_tokens

    def swap_time(self, tokens: int) -> float:
        return 1e-5 * tokens

    def recompute_time(self, tokens: int) -> float:
        return 1e-6 * tokens


def make_req(rid: int, arrival: float, prompt: int, out: int, *, pred: int | None = None,
             reserve: int | None = None, bucket: int = 0, max_tokens: int = 4096,
             slo: SLO | None = None) -> Request:
    r = Request(rid, arrival, prompt, max_tokens, out, slo=slo or SLO(5.0, 0.2))
    r.pred_tokens = out if pred is None else pred
    r.reserve_tokens = r.pred_tokens if reserve is None else reserve
    r.pred_bucket = bucket
    return r
