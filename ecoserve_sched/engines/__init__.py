"""Real serving engines driven by ecoserve_sched policies (transformers continuous batching, vLLM)."""
