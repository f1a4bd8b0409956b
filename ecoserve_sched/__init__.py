"""ecoserve_sched: an EcoServe-style scheduler driven by response-length predictions."""

__version__ = "0.1.0"
