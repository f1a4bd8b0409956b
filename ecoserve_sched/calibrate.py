"""Calibrate the simulator's cost model against a real engine (transformers continuous batching).

``calibrate(model, device, grid)`` builds a causal LM with random weights from a config, runs
small workloads through :class:`~ecoserve_sched.engines.transformers_cb.TransformersEngine`
(real iterations: scheduling, input preparation, forward pass, sampling, output update) on the
step clock so that batch shapes are deterministic, times every iteration, and fits the
profile's efficiency factors with :func:`~ecoserve_sched.cost_model.fit_profile`.

Each grid run is ``B`` requests of ``P`` prompt tokens arriving together and generating ``K``
tokens (the policy is ``vllm``: chunked prefill within the token budget, so large prompts spill
into mixed prefill + decode iterations), optionally with one ``Q``-token prompt arriving at
iteration 2 while the others decode. A run yields one sample per iteration: prefill-only,
decode-only at context ~P..P+K and mixed shapes. The ``replay`` grid adds chat-like replays (:data:`REPLAYS`): Poisson
arrivals of log-normal prompts and responses, the mixed shapes a served workload produces.
The profile's hardware numbers (peak FLOP/s,
memory bandwidth) are measured on the device with a matmul and a copy; the fit finds which
fraction of them the engine reaches, plus fixed and per-request overheads.
"""

from __future__ import annotations

import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlpredict.json_file import read_json
from rlpredict.outputs import raise_if_interrupted

from .cost_model import CostModel, ProfileError, fit_profile, model_fields

#: Random-weight Llama configs small enough for CPU (``--model`` accepts these names too).
PRESETS: dict[str, dict[str, Any]] = {
    # the engine tests' model: 2 layers, hidden 64 (~0.1M parameters)
    "tiny-llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                       max_position_embeddings=2048),
    # ~20M parameters: matmuls dominate a CPU iteration, as the weights do on a GPU
    "small-llama": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, vocab_size=8000,
                        max_position_embeddings=4096),
}

#: (decoding requests B, prompt tokens P, new tokens K, joining prompt Q or 0) per run.
GRIDS: dict[str, list[tuple[int, int, int, int]]] = {
    # up to ~2k tokens of KV per batch, the range where the CPU sdpa path stays roofline-like
    "small": [(b, p, 6, 0) for b in (1, 4, 16) for p in (16, 64, 128)]
    + [(4, 64, 8, 256), (16, 32, 8, 256), (8, 96, 8, 512)],
    "test": [(1, 16, 4, 0), (4, 32, 4, 0), (2, 64, 4, 32), (8, 16, 4, 0)],
    "full": [(b, p, 8, 0) for b in (1, 2, 4, 8, 16, 32, 64) for p in (16, 64, 256, 1024)]
    + [(b, 128, 10, q) for b in (4, 16, 64) for q in (64, 256, 1024)],
}

GRIDS["replay"] = GRIDS["small"]  # plus chat-like replays (see REPLAYS)

#: Chat-like replays run after a grid's batch shapes: (requests, arrivals per iteration) each.
#: Light and moderate load (a prompt every 20 and every 10 iterations), where a served engine
#: spends its time: mostly single-prompt prefills next to a few decodes. Heavier replays (0.25,
#: 0.5 per iteration) fill the fit with batched prefills that cost more per token on a CPU and
#: made the simulated TTFT too high (``benchmarks/calibration_replays.py``, docs/engines.md).
REPLAYS: dict[str, list[tuple[int, float]]] = {"replay": [(32, 0.05), (32, 0.1)]}

#: ``--dtype`` choices (torch dtype names).
DTYPES = ("float32", "bfloat16", "float16")


class CalibrationError(ValueError):
    """Calibration cannot run as asked: a device that is not there, an unknown dtype, a
    missing extra."""


@dataclass
class Calibration:
    profile: CostModel
    samples: list[tuple[float, float, float, float, float]]
    holdout: dict[str, float]  # error of a fit on 2/3 of the samples, on the other third
    noise: float | None  # timing noise between repeats of the same iteration (see measure)
    seconds: float

    def report(self) -> str:
        fe = self.profile.fit_error or {}
        e = self.profile.spec["efficiency"]
        noise = ("" if self.noise is None else
                 f"timing noise between repeats: {100 * self.noise:.1f}% (a floor for the fit error)\n")
        return (f"{self.profile.name}: {fe.get('n_samples')} iterations measured in {self.seconds:.1f}s\n"
                f"fit error (in-sample): mean {100 * fe.get('mean_rel_error', 0):.1f}%, "
                f"max {100 * fe.get('max_rel_error', 0):.1f}%\n"
                f"held-out third: mean {100 * self.holdout['mean_rel_error']:.1f}%, "
                f"max {100 * self.holdout['max_rel_error']:.1f}%\n{noise}"
                f"mfu {e['mfu']:.3g}, mbu {e['mbu']:.3g}, overhead {_ms(e['overhead_s'])} ms, "
                f"per decoding request {_ms(e['overhead_per_seq_s'])} ms, "
                f"prefill {_ms(e['prefill_overhead_s'])} ms"
                + "".join(f"\n{what}: {', '.join(fe[key])}" for key, what in (
                    ("not_fitted", "not fitted (no measured iteration depends on it; the base value kept)"),
                    ("at_bound", "at the fit's bound (the model cannot follow the measurements there)"),
                    ("not_determined", "not determined (other values fit the measured iterations as well)"))
                    if fe.get(key))
                + (f"\nwarning: the fit misses held-out iterations by {100 * self.holdout['mean_rel_error']:.0f}% "
                   "on average: this profile's iteration times are rough (a busy machine, or an engine the "
                   "cost model does not describe); measure again on an idle device or with --repeats"
                   if self.holdout["mean_rel_error"] > ROUGH_FIT else ""))


#: A held-out mean relative error above this is said as a warning under the report.
ROUGH_FIT = 0.25


def _ms(seconds: float) -> str:
    """Milliseconds to 3 significant digits; 0 for a fit's lower bound (was: "7.78e-16 ms")."""
    return "0" if abs(seconds) < 1e-9 else f"{1e3 * seconds:.3g}"


def check_setup(device: str, dtype: str | None = None) -> None:
    """Refuse, in one line naming the option, a ``--device`` this machine cannot run on, an
    unknown ``--dtype``, or a missing ``[engines]`` extra (torch, transformers, scipy)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise CalibrationError(f"--device {device!r}: use cpu, cuda or cuda:N")
    if dtype is not None and dtype not in DTYPES:
        raise CalibrationError(f"--dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    try:
        import scipy  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        raise CalibrationError(f"calibration needs the [engines] extra (torch, transformers, scipy): "
                               f"{e}; in a checkout: pip install -c constraints.txt -e '.[engines]'") from None
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        built = "" if torch.version.cuda else " (this torch build has no CUDA)"
        raise CalibrationError(f"--device {device}: CUDA is not available{built}; use --device cpu")
    index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        raise CalibrationError(f"--device {device}: this machine has {count} CUDA device(s)")


def model_inputs(model: str) -> list[Path]:
    """The files ``--model`` reads (none for a preset): the config JSON itself, or a folder's
    config.json. An output must not replace them. A preset's name that is also a path here is
    refused (which one is meant is not known)."""
    if not model.strip():
        raise CalibrationError("--model: empty; give a preset name, a config.json or a folder holding one")
    if model in PRESETS:
        if Path(model).exists():
            raise CalibrationError(f"--model {model}: both a preset and a path here; for the path, "
                                   f"write ./{model}")
        return []
    path = Path(model)
    return [path / "config.json" if path.is_dir() else path]


def load_model(model: str, device: str = "cpu", dtype: str | None = None, seed: int = 0) -> Any:
    """A causal LM with random weights from a preset name, a config JSON file (any name), or a
    directory holding a config.json."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    spec: dict[str, Any] = {}
    if model not in PRESETS:
        (path,) = model_inputs(model)
        if not path.is_file():
            raise FileNotFoundError(f"{model}: not a preset ({', '.join(PRESETS)}), a config.json "
                                    "or a directory holding one")
        try:
            spec = read_json(path)  # names the line of bad JSON; a key given twice is refused
        except OSError as e:
            raise CalibrationError(f"{path}: not a readable JSON config ({e.strerror or e})") from None
        except ValueError as e:
            raise CalibrationError(str(e)) from None
        if not isinstance(spec, dict) or not isinstance(spec.get("model_type"), str):
            raise CalibrationError(f"{path}: field 'model_type' is missing: a transformers "
                                   "config.json names its architecture there")
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    torch.manual_seed(seed)
    if model in PRESETS:
        m = AutoModelForCausalLM.from_config(LlamaConfig(**PRESETS[model]), dtype=torch_dtype)
    else:
        # A user's config: what transformers' validation (strict dataclasses: a bare Exception
        # subclass) or the model's construction (a negative size: torch's RuntimeError) refuses
        # is the file's fault.
        from huggingface_hub.errors import StrictDataclassError
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its warnings about the file (a pad_token_id past the
        try:  # vocabulary) came before our line: what is wrong is said once, in the error
            config = AutoConfig.for_model(**spec)
            # what the cost model cannot describe is refused before the weights are built (a
            # mixture-of-experts config could take more memory than the machine has)
            fields = model_fields(config, torch_dtype.itemsize)
            _sizes_given(spec, config, path)
            if fields["vocab"] < MIN_VOCAB:
                raise CalibrationError(f"{path}: field 'vocab_size' ({fields['vocab']}) must be at least "
                                       f"{MIN_VOCAB}: calibration prompts are random token ids")
            need, have = fields["n_params"] * torch_dtype.itemsize, memory_available()
            if have is not None and need > have:  # was: blamed on the config ("can't allocate memory")
                raise CalibrationError(f"{path}: its weights take {need / 2**30:.1f} GiB in {torch_dtype} "
                                       f"and this process has {have / 2**30:.1f} GiB of memory available (they "
                                       "are built in host memory, also for a GPU): calibrate a smaller config")
            m = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        except CalibrationError:
            raise
        except ProfileError as e:
            raise CalibrationError(f"{path}: {e}") from None
        except (ValueError, TypeError, KeyError, RuntimeError, AssertionError, StrictDataclassError) as e:
            # AssertionError: a pad_token_id outside the vocabulary (torch's Embedding asserts)
            raise CalibrationError(f"{path}: not a config transformers can build a model from "
                                   f"({' '.join(str(e).split())})") from None
        finally:
            hf_logging.set_verbosity(verbosity)
    m.generation_config.eos_token_id = None
    return m.to(device).eval()


def memory_available() -> int | None:
    """Bytes of host memory this process can still take: the kernel's estimate of what is
    available (``MemAvailable``), capped by the address-space limit (``ulimit -v``); None where
    neither is known."""
    import resource

    have = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            have = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except (OSError, ValueError, IndexError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        have = soft if have is None else min(have, soft)
    return have


#: The sizes a config file must give: without one transformers builds its class default (a
#: Llama config without ``num_hidden_layers`` is 32 layers; without any size, Llama-2-7B).
SIZE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
#: Fewest token ids a calibrated model may have: prompts draw ids from [3, min(vocab, 200)).
MIN_VOCAB = 4


def _sizes_given(spec: dict[str, Any], config: Any, path: Path) -> None:
    """Refuse a config file that leaves out one of :data:`SIZE_FIELDS` (or its alias in the
    config class's ``attribute_map``; for OPT, ``ffn_dim``): a misspelt key was silently the
    default."""
    aliases = {v: k for k, v in getattr(type(config), "attribute_map", {}).items()}
    for f in SIZE_FIELDS:
        opt_mlp = ("ffn_dim",) if f == "intermediate_size" and spec.get("model_type") == "opt" else ()
        names = {f, *(a for a, target in aliases.items() if target == f), *opt_mlp}
        if not names & spec.keys():
            default = getattr(config, f, None)
            raise CalibrationError(f"{path}: field '{f}' is missing (transformers would build its default, "
                                   f"{default}, without a word: a misspelt key?)")


def model_section(m: Any) -> dict[str, Any]:
    """The profile's ``model`` section from a loaded model's config (``cost_model.model_fields``),
    with its parameters counted."""
    fields = model_fields(m.config, next(m.parameters()).element_size(),
                          n_params=int(sum(p.numel() for p in m.parameters())))
    fields["source"] = {"architecture": f"config of the calibrated model ({type(m).__name__}): "
                        f"{fields['source']['architecture']}; weights random"}
    return fields


def device_section(device: str, dtype: Any = None) -> dict[str, Any]:
    """The profile's ``gpu`` section, measured: best-of-5 matmul FLOP/s (in ``dtype``, the
    model's; default bf16 on CUDA, fp32 on CPU) and copy bandwidth."""
    import torch

    cuda = device.startswith("cuda")
    dt = dtype or (torch.bfloat16 if cuda else torch.float32)
    n = 4096 if cuda else 1024
    a, b = torch.randn(n, n, dtype=dt, device=device), torch.randn(n, n, dtype=dt, device=device)
    src = torch.empty((1 << 30) if cuda else (1 << 26), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)

    def best(fn: Any) -> float:
        ts = []
        for _ in range(6):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        return min(ts[1:])

    flops = 2 * n**3 / best(lambda: a @ b)
    bw = 2 * src.numel() / best(lambda: dst.copy_(src))
    if cuda:
        mem = torch.cuda.get_device_properties(device).total_memory
        host = torch.empty(1 << 28, dtype=torch.uint8, pin_memory=True)
        pcie = host.numel() / best(lambda: src[: host.numel()].copy_(host, non_blocking=False))
        what = torch.cuda.get_device_name(device)
    else:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        threads = torch.get_num_threads()
        pcie, what = bw, f"{platform.processor() or platform.machine()} CPU, {threads} thread{'s' * (threads != 1)}"
    note = f"measured on {what}"
    return {"peak_flops": flops, "hbm_bw": bw, "hbm_bytes": int(mem), "pcie_bw": pcie,
            "source": {"peak_flops": f"best {n}x{n} {dt} matmul, {note}",
                       "hbm_bw": f"best device-to-device copy (read + write bytes), {note}",
                       "hbm_bytes": f"total device memory, {note}",
                       "pcie_bw": "host-to-device pinned copy" if cuda else "CPU: same as hbm_bw (KV stays in RAM)"}}


def _run_requests(b: int, p: int, k: int, q: int, seed: int, vocab: int = 200) -> list[Any]:
    from .engines.transformers_cb import GenRequest

    rng = np.random.default_rng(seed)
    hi = min(vocab, 200)
    reqs = [GenRequest(rng.integers(3, hi, p).tolist(), k, 0.0) for _ in range(b)]
    if q:
        reqs.append(GenRequest(rng.integers(3, hi, q).tolist(), 2, 2.0))
    return reqs


def chat_lengths(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Chat-like (prompt, response) token lengths scaled to a small model: log-normal around
    96 and 32 tokens (Azure conversation's ~2:1), clipped to [8, 512] and [4, 160]."""
    prompt = np.clip(rng.lognormal(np.log(96), 0.8, n), 8, 512).astype(int)
    out = np.clip(rng.lognormal(np.log(32), 0.8, n), 4, 160).astype(int)
    return prompt, out


def _chat_requests(n: int, per_iter: float, seed: int, vocab: int = 200) -> list[Any]:
    """``n`` requests of :func:`chat_lengths` arriving as a Poisson process of ``per_iter``
    requests per iteration (step clock)."""
    from .engines.transformers_cb import GenRequest

    rng = np.random.default_rng(seed)
    prompt, out = chat_lengths(rng, n)
    arrivals = np.cumsum(rng.exponential(1.0 / per_iter, n)).round()
    return [GenRequest(rng.integers(3, min(vocab, 200), p).tolist(), int(o), float(a))
            for p, o, a in zip(prompt, out, arrivals, strict=True)]


def measure(m: Any, grid: list[tuple[int, int, int, int]], token_budget: int = 2048,
            block_size: int = 16, repeats: int = 3, replays: list[tuple[int, float]] = ()
            ) -> tuple[list[tuple[float, float, float, float, float]], float | None]:
    """Run every grid workload (then every chat replay) ``repeats`` times through the engine;
    one sample per iteration, with the median of its measured times (shapes repeat exactly on
    the step clock). Also returns the timing noise: the mean over iterations of
    max |repeat - median| / median."""
    from .engines.transformers_cb import TransformersEngine

    samples, noise = [], []
    warm = [(2, 32, 3, 0)]
    vocab = model_fields(m.config, 1)["vocab"]
    workloads = ([_run_requests(b, p, k, q, seed=i, vocab=vocab) for i, (b, p, k, q) in enumerate(warm + grid)]
                 + [_chat_requests(n, rate, seed=1000 + i, vocab=vocab) for i, (n, rate) in enumerate(replays)])
    for i, reqs in enumerate(workloads):
        raise_if_interrupted()  # an interrupt raised in transformers' __del__ is swallowed there
        blocks = sum(-(-(len(g.prompt_ids) + g.max_new_tokens) // block_size) for g in reqs) + 4
        eng = TransformersEngine(m, "vllm", clock="step", block_size=block_size, kv_blocks=blocks,
                                 token_budget=token_budget,
                                 max_running=max(len(reqs) + 1, 2))
        runs = [eng.generate(reqs) for _ in range(repeats if i >= len(warm) else 1)]
        for run in runs:
            short = [(g, r) for g, r in zip(reqs, run.results, strict=True) if len(r.tokens) != g.max_new_tokens]
            if short:  # was: a bare assert (exit 1, "a bug"), gone under python -O
                g, r = short[0]
                kind = getattr(m.config, "model_type", "?")
                raise CalibrationError(
                    f"the transformers engine ended {len(short)} of {len(reqs)} requests of a calibration run "
                    f"unfinished ({r.error or f'{len(r.tokens)} of {g.max_new_tokens} tokens'}): model type "
                    f"{kind!r} may not run under transformers' continuous batching")
        if i < len(warm):
            continue
        rows = np.asarray([run.samples() for run in runs], dtype=float)  # repeats x iters x 5
        if not (rows[:, :, :4] == rows[:1, :, :4]).all():  # the step clock repeats them exactly
            raise RuntimeError("calibration: batch shapes differ between repeats of one workload (a bug)")
        med = np.median(rows[:, :, 4], axis=0)
        samples += [(*map(float, r[:4]), float(t)) for r, t in zip(rows[0], med, strict=True)]
        noise += list(np.abs(rows[:, :, 4] - med).max(axis=0) / med)
    return samples, float(np.mean(noise)) if repeats > 1 else None


def default_stem(model: str) -> str:
    """The default profile name's model part: the preset, the config file's name, or the
    folder's (``my-model`` or ``my-model/config.json``: ``my-model``, was ``config``)."""
    path = Path(model)
    if path.is_dir():  # Qwen2.5-0.5B, not Qwen2.5-0; ".", the folder's name
        return path.resolve().name
    return path.parent.resolve().name if path.stem == "config" and path.suffix == ".json" else path.stem


def base_profile(m: Any, device: str, name: str) -> CostModel:
    """An unfitted profile: the model's constants, the measured device, neutral efficiencies."""
    eff = {"mfu": 0.5, "mbu": 0.5, "pcie_eff": 1.0, "overhead_s": 1e-3, "overhead_per_seq_s": 1e-4,
           "prefill_overhead_s": 1e-3, "activation_reserve_bytes": 0,
           "source": {"pcie_eff": "not calibrated", "activation_reserve_bytes": "not modelled"}}
    spec = {"name": name, "model": model_section(m), "gpu": device_section(device, next(m.parameters()).dtype),
            "efficiency": eff}
    return CostModel(spec, name)  # token_budget: the knee (the engine's budget is calibration.token_budget)


def calibrate(model: str, device: str = "cpu", grid: str = "small", name: str | None = None,
              dtype: str | None = None, token_budget: int = 2048, repeats: int = 3,
              threads: int | None = None) -> Calibration:
    """Measure the engine over ``GRIDS[grid]`` and fit a profile (see module docstring);
    ``threads``: torch CPU threads (default: torch's)."""
    check_setup(device, dtype)
    if grid not in GRIDS:
        raise CalibrationError(f"--grid {grid!r}: choose from {', '.join(GRIDS)}")
    if name is not None and not name.strip():  # was: the default name, without a word
        raise CalibrationError("--name: empty; give the profile a name, or leave --name out for the default")
    # requests at once: a row's b, and one more with its q-token prompt beside them (q > 0)
    most = max([b + (q > 0) for b, _, _, q in GRIDS[grid]] + [n for n, _ in REPLAYS.get(grid, [])] + [2])
    if token_budget < most + 2:  # the engine's slots: the run's requests and one; a budget above them
        # (was: raised to the slots without a word, then refused mid-run, naming that number)
        raise CalibrationError(f"--token-budget {token_budget}: grid {grid!r} runs up to {most} requests at once, "
                               f"so the engine needs a budget of at least {most + 2} tokens")
    import torch
    import transformers

    if threads is not None:
        torch.set_num_threads(threads)

    t = time.perf_counter()
    m = load_model(model, device, dtype)
    name = name or f"{default_stem(model)}-transformers-{device.split(':')[0]}"
    base = base_profile(m, device, name)
    try:
        samples, noise = measure(m, GRIDS[grid], token_budget, repeats=repeats,
                                 replays=REPLAYS.get(grid, []))
    except CalibrationError as e:
        raise CalibrationError(f"{model_inputs(model)[0] if model not in PRESETS else model}: {e}") from None
    how = (f"`ecoserve calibrate --engine transformers --model {model} --device {device} --grid {grid}` "
           f"({len(samples)} measured iterations)")
    fitted = fit_profile(samples, base, name, how)
    test = samples[2::3]
    part = fit_profile([s for i, s in enumerate(samples) if i % 3 != 2], base, name)
    arr = np.asarray(test, dtype=float)
    rel = np.abs(part.predict(arr[:, :4]) / arr[:, 4] - 1.0)
    spec = fitted.to_json()
    spec["calibration"] = {
        "engine": f"transformers {transformers.__version__} continuous batching "
                  "(ecoserve_sched.engines.transformers_cb, policy vllm, step clock)",
        "torch": torch.__version__, "device": device, "threads": torch.get_num_threads(),
        "model": model, "dtype": str(next(m.parameters()).dtype).removeprefix("torch."),
        "weights": "random", "grid": grid, "replays": REPLAYS.get(grid, []), "repeats": repeats,
        "token_budget": token_budget, "statistic": "median",
        "measured": "wall time of each engine iteration: scheduling, input preparation, "
                    "forward, greedy sampling, output update",
        "holdout": {"mean_rel_error": float(rel.mean()), "max_rel_error": float(rel.max())},
        "noise_between_repeats": noise,
        "samples": [[int(x) for x in r[:4]] + [round(float(r[4]), 6)] for r in samples],
        "sample_columns": ["prefill_tokens", "prefill_ctx_tokens", "decode_requests",
                           "decode_ctx_tokens", "seconds"],
    }
    return Calibration(CostModel(spec, name), samples, spec["calibration"]["holdout"], noise,
                       time.perf_counter() - t)


def save(cal: Calibration, path: str | Path) -> None:
    """Write the fitted profile (loadable by ``cost_model.load_profile``; ``CostModel.save``:
    strict JSON, atomic)."""
    cal.profile.save(path)
