"""S3 (Jin et al. 2023): reserve KV for the predicted RL bucket, restart on overrun.

Admission is FCFS with chunked prefill; each request reserves ``prompt + reserve_tokens`` of
its predicted bucket. A request that fills its reservation is preempted (recompute) and comes
back with a doubled response reservation, as S3 reassigns a larger bucket after a misprediction.
"""

from __future__ import annotations

from ..request import Request
from .base import Scheduler
from .orca import OrcaScheduler
from .registry import register


class S3Scheduler(OrcaScheduler):
    name = "s3"
    prediction_override = None  # reserves the prediction
    chunked_prefill = True

    def reservation_blocks(self, r: Request) -> int:
        return Scheduler.reservation_blocks(self, r)

    def easy_alarm(self, r: Request) -> bool:
        return False  # every alarm is a restart

    def on_alarm(self, r: Request) -> None:
        r.reserved_extra += max(r.reserve_tokens, 1) + r.reserved_extra  # double the response part
        self.counters["restarts"] += 1
        self.preempt(r, self.now)


register("s3", S3Scheduler)
