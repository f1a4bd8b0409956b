"""Iteration-latency cost model for the simulator: a roofline of one model on one GPU.

time = max(FLOPs / (peak * mfu), bytes / (bw * mbu)) + overhead_s
       + overhead_per_seq_s * decode_requests + prefill_overhead_s * [any prefill tokens]

A profile is a model file (``profiles/models/<model>.json``) plus a GPU file
(``profiles/gpus/<gpu>.json``, which also holds the efficiency factors), combined by the
name ``<model>-<gpu>``; or one JSON file with ``model``, ``gpu`` and ``efficiency``
sections (what :meth:`CostModel.save` writes). See docs/cost_model.md.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlpredict.json_file import dumps, read_json
from rlpredict.outputs import write_text_atomic

PROFILES_DIR = Path(__file__).parent / "profiles"
DEFAULT_PROFILE = "llama2-13b-a100-80gb"
MODEL_FIELDS = ("n_params", "n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim",
                "intermediate", "mlp_mats", "vocab", "dtype_bytes")
GPU_FIELDS = ("peak_flops", "hbm_bw", "hbm_bytes", "pcie_bw")
EFF_FIELDS = ("mfu", "mbu", "pcie_eff", "overhead_s", "overhead_per_seq_s",
              "prefill_overhead_s", "activation_reserve_bytes")
FIT_FIELDS = ("mfu", "mbu", "overhead_s", "overhead_per_seq_s", "prefill_overhead_s")
#: The keys a profile may hold besides its sections' fields: a typo (``token_budgett``) is
#: refused, not dropped. ``calibration`` is what ``ecoserve calibrate`` measured.
TOP_KEYS = frozenset({"name", "model", "gpu", "efficiency", "fit", "calibration", "token_budget",
                      "gpu_memory_utilization", "paper_era", "source"})
SECTION_KEYS = {"model": frozenset(MODEL_FIELDS) | {"source", "hf_id", "max_model_len"},
                "gpu": frozenset(GPU_FIELDS) | {"source"}, "efficiency": frozenset(EFF_FIELDS) | {"source"}}
#: What a GPU file (``profiles/gpus/<gpu>.json``) may hold; its ``gpu_memory_utilization`` and
#: ``token_budget`` carry into every profile built on it.
GPU_FILE_KEYS = frozenset({"gpu", "efficiency", "token_budget", "gpu_memory_utilization", "paper_era", "source"})
Sample = tuple[float, float, float, float, float]
#: A one-token iteration slower than this (an hour) is a profile typo, not a GPU.
MAX_ITERATION_S = 3600.0
#: Bounds of what a profile describes (``CostModel`` refuses a number outside them): one
#: machine's memory, a host link's bytes/s (1e8: a GB/s figure written as bytes/s is far below),
#: and each overhead in seconds (``fit_profile``'s own bound).
MAX_BYTES = 2**50
MIN_LINK_BW, MAX_LINK_BW = 1e8, 1e14
OVERHEAD_FIELDS = ("overhead_s", "overhead_per_seq_s", "prefill_overhead_s")
MAX_OVERHEAD_S = 1.0
#: A token budget per iteration (a profile's ``token_budget``, ``--token-budget``): 2 to 2^20.
MAX_TOKEN_BUDGET = 1 << 20
#: The longest context a profile's optional ``model.max_model_len`` may give (2^24 tokens).
MAX_MODEL_LEN = 1 << 24


class ProfileError(ValueError):
    """A profile file is missing a field or has a bad value."""


def prefill_ctx_tokens(chunk: int, prefilled: int = 0) -> int:
    """The attention context of a prefill chunk of ``chunk`` prompt tokens after ``prefilled``
    already computed, as ``iteration_time`` counts it: the chunk times the context after it (the
    causal mask's halving is in the per-token cost, ``flops_per_prefill_ctx``)."""
    return chunk * (prefilled + chunk)


class CostModel:
    """Roofline iteration latency, KV capacity, swap and recompute costs for a model+GPU."""

    def __init__(self, spec: dict[str, Any], origin: str = "<dict>") -> None:
        _known_keys(spec, TOP_KEYS, origin)
        for section, fields in (("model", MODEL_FIELDS), ("gpu", GPU_FIELDS),
                                ("efficiency", EFF_FIELDS)):
            sec = spec.get(section)
            if sec is None:
                raise ProfileError(f"{origin}: missing section '{section}'")
            if not isinstance(sec, dict):
                raise ProfileError(f"{origin}: section '{section}' must be an object, got {_kind(sec)}")
            _known_keys(sec, SECTION_KEYS[section], origin, f"{section}.")
            for f in fields:
                v = sec.get(f)
                if f not in sec:
                    raise ProfileError(f"{origin}: field '{section}.{f}' is missing")
                if not _number(v):
                    raise ProfileError(f"{origin}: field '{section}.{f}' must be a number, got {v!r}")
                if v < 0 or (v == 0 and section != "efficiency"):
                    raise ProfileError(f"{origin}: field '{section}.{f}' must be positive, got {v!r}")
                if section == "model" and (v != int(v) or v > 2**53):
                    raise ProfileError(f"{origin}: field 'model.{f}' must be a whole number up to 2^53, got {v!r}")
        m = spec["model"]
        if m["dtype_bytes"] not in (1, 2, 4):
            raise ProfileError(f"{origin}: field 'model.dtype_bytes' must be 1, 2 or 4, got {m['dtype_bytes']!r}")
        if m["mlp_mats"] not in (2, 3):
            raise ProfileError(f"{origin}: field 'model.mlp_mats' must be 2 (an OPT-style MLP) or 3 (a gated "
                               f"MLP), got {m['mlp_mats']!r}")
        mml = m.get("max_model_len")  # optional: the context length vllm-v0 holds prompts to
        if mml is not None and not (_number(mml) and mml == int(mml) and 1 <= mml <= MAX_MODEL_LEN):
            raise ProfileError(f"{origin}: field 'model.max_model_len' must be a whole number from 1 to 2^24 "
                               f"(the model's context length in tokens), got {mml!r}")
        g = spec["gpu"]
        if g["hbm_bytes"] > MAX_BYTES:
            raise ProfileError(f"{origin}: field 'gpu.hbm_bytes' must be at most 2^50 (1 PiB), got {g['hbm_bytes']!r}")
        if not MIN_LINK_BW <= g["pcie_bw"] <= MAX_LINK_BW:  # GB/s written for bytes/s: swaps of hours
            raise ProfileError(f"{origin}: field 'gpu.pcie_bw' must be in bytes/s, from 1e8 to 1e14, got "
                               f"{g['pcie_bw']!r}")
        if m["n_heads"] % m["n_kv_heads"]:
            raise ProfileError(f"{origin}: field 'model.n_kv_heads' ({m['n_kv_heads']!r}) must divide "
                               f"model.n_heads ({m['n_heads']!r})")
        fit = spec.get("fit")
        if fit is not None and not (isinstance(fit, dict) and all(
                _number(v) or (isinstance(v, list) and all(isinstance(f, str) and f in FIT_FIELDS for f in v))
                for v in fit.values())):
            raise ProfileError(f"{origin}: field 'fit' must be an object of numbers and lists of fitted "
                               f"factors (what fit_profile writes), got {fit!r}")
        e = spec["efficiency"]
        for f in ("mfu", "mbu", "pcie_eff"):
            if not 0 < e[f] <= 1:
                raise ProfileError(f"{origin}: field 'efficiency.{f}' must be in (0, 1], got {e[f]!r}")
        for f in OVERHEAD_FIELDS:  # fit_profile's bound; milliseconds written as seconds pass it
            if e[f] > MAX_OVERHEAD_S:
                raise ProfileError(f"{origin}: field 'efficiency.{f}' must be in seconds, at most "
                                   f"{MAX_OVERHEAD_S:g}, got {e[f]!r}")
        util = spec.get("gpu_memory_utilization", 0.9)
        if not _number(util) or not 0 < util <= 1:
            raise ProfileError(f"{origin}: field 'gpu_memory_utilization' must be in (0, 1], got {util!r}")
        tb = spec.get("token_budget")
        if tb is not None and (not _number(tb) or tb != int(tb) or not 2 <= tb <= MAX_TOKEN_BUDGET):
            # (was: 1 to 2^53, where --token-budget takes 2 to 2^20)
            raise ProfileError(f"{origin}: field 'token_budget' must be a whole number from 2 to 2^20, got {tb!r}")
        self.spec = spec
        name = spec.get("name", Path(origin).stem)
        if not isinstance(name, str) or not name.strip():
            raise ProfileError(f"{origin}: field 'name' must be a non-empty string, got {name!r}")
        self.name: str = name
        self.path: str | None = None  # the file it was loaded from (None: shipped, or built)
        self.gpu_memory_utilization: float = float(util)
        self.fit_error: dict[str, Any] | None = fit
        q_dim, kv_dim = m["n_heads"] * m["head_dim"], m["n_kv_heads"] * m["head_dim"]
        h, n_layers, dt = m["hidden"], m["n_layers"], m["dtype_bytes"]
        # Linear-layer parameters touched per token (attention projections + MLP) and the LM head.
        self.layer_params = n_layers * layer_weights(h, q_dim, kv_dim, m["mlp_mats"], m["intermediate"])
        self.lm_head_params = m["vocab"] * h
        # Efficiency-free structure: FLOPs and bytes per unit of each input.
        self.flops_per_token = 2.0 * self.layer_params
        self.flops_per_logit = 2.0 * self.lm_head_params
        self.flops_per_prefill_ctx = 2.0 * n_layers * q_dim  # QK^T + PV, 4*L*q_dim, halved by the causal mask
        self.flops_per_decode_ctx = 4.0 * n_layers * q_dim
        self.weight_bytes_read = float((self.layer_params + self.lm_head_params) * dt)
        self.kv_bytes_per_token = float(2 * n_layers * kv_dim * dt)
        self.weight_bytes_stored = float(m["n_params"] * dt)
        if m["n_params"] < self.layer_params + self.lm_head_params:  # KV room from weights never loaded
            raise ProfileError(f"{origin}: field 'model.n_params' ({m['n_params']!r}) is below the "
                               f"{self.layer_params + self.lm_head_params:,} weights its layers and LM head "
                               "hold (model.hidden, n_layers, intermediate, vocab, ...)")
        self._set_efficiency(e)
        one = self.iteration_time(1, 1, 1, 1)
        if not (math.isfinite(self.weight_bytes_stored) and math.isfinite(self.kv_bytes_per_token)
                and 0 < one < MAX_ITERATION_S):
            raise ProfileError(f"{origin}: its numbers give a one-token iteration of {one:.3g} s (or an "
                               "infinite size): check gpu.peak_flops, gpu.hbm_bw and the efficiency fields")
        tb = spec.get("token_budget")
        self.token_budget: int = int(tb) if tb else self.knee_tokens()

    def _set_efficiency(self, e: dict[str, float]) -> None:
        g = self.spec["gpu"]
        inv_f, inv_b = 1.0 / (g["peak_flops"] * e["mfu"]), 1.0 / (g["hbm_bw"] * e["mbu"])
        self._c_tok, self._c_logit = self.flops_per_token * inv_f, self.flops_per_logit * inv_f
        self._c_pctx, self._c_dctx = self.flops_per_prefill_ctx * inv_f, self.flops_per_decode_ctx * inv_f
        self._m_w, self._m_kv = self.weight_bytes_read * inv_b, self.kv_bytes_per_token * inv_b
        self._oh, self._oh_seq, self._oh_pf = e["overhead_s"], e["overhead_per_seq_s"], e["prefill_overhead_s"]
        self._swap = self.kv_bytes_per_token / (g["pcie_bw"] * e["pcie_eff"])

    @property
    def label(self) -> str:
        """The name reports print: with the file's path if loaded from one (a hand-edited copy of
        a shipped profile keeps its name)."""
        return self.name if self.path is None else f"{self.name} ({self.path})"

    def iteration_time(self, prefill_tokens: int, prefill_ctx_tokens: int,
                       decode_requests: int, decode_ctx_tokens: int) -> float:
        """Seconds for one iteration (0 for an empty one). ``prefill_ctx_tokens``: the sum of
        ``prefill_ctx_tokens(chunk, prefilled)`` over its prefill chunks. Hot path: a few
        multiplies."""
        if prefill_tokens <= 0 and decode_requests <= 0:
            return 0.0
        compute = (self._c_tok * (prefill_tokens + decode_requests) + self._c_logit * decode_requests
                   + self._c_pctx * prefill_ctx_tokens + self._c_dctx * decode_ctx_tokens)
        memory = self._m_w + self._m_kv * (prefill_tokens + decode_ctx_tokens)
        t = (compute if compute > memory else memory) + self._oh + self._oh_seq * decode_requests
        return t + self._oh_pf if prefill_tokens > 0 else t

    def decode_run(self, d: int, ctx: int, now: float, until: float, steps: int) -> tuple[float, int]:
        """Run decode-only iterations of ``d`` requests holding ``ctx`` context tokens (each
        step adds ``d``) from time ``now``: at most ``steps`` of them, stopping after the first
        that ends at or after ``until``. Returns the time after them and how many ran. The
        simulator's fast path: the same floating-point operations, in the same order, as adding
        ``iteration_time(0, 0, d, ctx)`` step by step (so the same times to the last bit)."""
        a = self._c_tok * d + self._c_logit * d  # iteration_time's compute, its ctx-free part
        c_dctx, m_w, m_kv, oh, per_seq = self._c_dctx, self._m_w, self._m_kv, self._oh, self._oh_seq * d
        k = 0
        while k < steps:
            compute = a + c_dctx * ctx
            memory = m_w + m_kv * ctx
            now += (compute if compute > memory else memory) + oh + per_seq
            ctx += d
            k += 1
            if now >= until:
                break
        return now, k

    def swap_time(self, tokens: int) -> float:
        """Seconds to move ``tokens`` tokens' KV over PCIe, one direction."""
        return tokens * self._swap

    def recompute_time(self, tokens: int) -> float:
        """Marginal seconds to re-prefill ``tokens`` tokens as one sequence inside an iteration
        (compute only: the weights are read by that iteration anyway)."""
        return self._c_tok * tokens + self._c_pctx * tokens * tokens

    def kv_blocks(self, block_size: int, gpu_memory_utilization: float | None = None) -> int:
        """KV-cache blocks that fit: HBM * utilization - weights - activation reserve."""
        util = self.gpu_memory_utilization if gpu_memory_utilization is None else gpu_memory_utilization
        free = (self.spec["gpu"]["hbm_bytes"] * util - self.weight_bytes_stored
                - self.spec["efficiency"]["activation_reserve_bytes"])
        return max(0, int(free // (block_size * self.kv_bytes_per_token)))

    def knee_tokens(self) -> int:
        """Batched prefill tokens where compute time overtakes the weight read, rounded up to
        a power of two (the roofline knee of latency vs batched tokens)."""
        slope = self._c_tok - self._m_kv
        knee = self._m_w / slope if slope > 0 else 8192.0
        return 1 << max(4, math.ceil(math.log2(knee)))

    def predict(self, samples: np.ndarray, eff: dict[str, float] | None = None) -> np.ndarray:
        """Vectorised :meth:`iteration_time` over rows of (prefill_tokens, prefill_ctx_tokens,
        decode_requests, decode_ctx_tokens), optionally with other efficiency factors."""
        e, g = {**self.spec["efficiency"], **(eff or {})}, self.spec["gpu"]
        p, pc, d, dc = (np.asarray(samples, dtype=float)[:, i] for i in range(4))
        flops = (self.flops_per_token * (p + d) + self.flops_per_logit * d
                 + self.flops_per_prefill_ctx * pc + self.flops_per_decode_ctx * dc)
        nbytes = self.weight_bytes_read + self.kv_bytes_per_token * (p + dc)
        t = np.maximum(flops / (g["peak_flops"] * e["mfu"]), nbytes / (g["hbm_bw"] * e["mbu"]))
        t = t + e["overhead_s"] + e["overhead_per_seq_s"] * d + e["prefill_overhead_s"] * (p > 0)
        return np.where((p > 0) | (d > 0), t, 0.0)

    def to_json(self) -> dict[str, Any]:
        """The full profile as a JSON-ready dict (loadable by :func:`load_profile`)."""
        out = {**self.spec, "name": self.name, "gpu_memory_utilization": self.gpu_memory_utilization}
        if self.fit_error is not None:
            out["fit"] = self.fit_error
        return out

    def save(self, path: str | Path) -> None:
        """Write the profile to ``path``: strict JSON (NaN -> null), atomically (the caller
        decides whether an existing file may be replaced)."""
        write_text_atomic(path, dumps(self.to_json(), indent=2) + "\n")

    def __repr__(self) -> str:
        return f"CostModel({self.name!r}, token_budget={self.token_budget})"


def _kind(v: object) -> str:
    """The JSON name of ``v``'s type, for a message."""
    return {dict: "an object", list: "a list", str: "a string", bool: "true or false",
            type(None): "null"}.get(type(v), "a number")


def _number(v: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _known_keys(d: dict[str, Any], known: frozenset[str], origin: str, prefix: str = "") -> None:
    if unknown := sorted(set(d) - known):
        raise ProfileError(f"{origin}: field '{prefix}{unknown[0]}' is not a profile field (a typo?); "
                           f"known: {', '.join(sorted(known))}")


def _read(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path)  # names the line of bad JSON; a key given twice is refused
    except OSError as err:
        raise ProfileError(f"{path}: cannot read profile JSON ({err.strerror or err})") from None
    except ValueError as err:
        raise ProfileError(str(err)) from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a JSON object")
    return data


def list_profiles() -> list[str]:
    """Shipped profile names, ``<model>-<gpu>``."""
    models = sorted(p.stem for p in (PROFILES_DIR / "models").glob("*.json"))
    gpus = sorted(p.stem for p in (PROFILES_DIR / "gpus").glob("*.json"))
    return [f"{m}-{g}" for m in models for g in gpus]


def load_profile(name_or_path: str | Path = DEFAULT_PROFILE, *, kv_room: bool = True) -> CostModel:
    """Load a shipped profile by name (see :func:`list_profiles`) or a profile JSON file;
    a profile whose model leaves no room for a KV cache at its own ``gpu_memory_utilization``
    is refused (``kv_room=False``: not checked here, where the server's settings size the cache)."""
    if isinstance(name_or_path, str) and not name_or_path.strip():  # (was: ".: a folder, not a profile")
        raise ProfileError(f"empty profile name: give a shipped name ({', '.join(list_profiles())}) or a profile "
                           "JSON file")
    if not isinstance(name_or_path, str | Path):
        raise TypeError(f"load_profile: give a profile name or path, got {type(name_or_path).__name__}")
    path = Path(name_or_path)
    if path.is_dir():
        raise ProfileError(f"{path}: a folder, not a profile: give a profile JSON file (`ecoserve calibrate --out` "
                           f"writes one) or a shipped name: {', '.join(list_profiles())}")
    if path.exists() and not path.is_file():  # (was: a named pipe hung the read, and vLLM's start-up with it)
        raise ProfileError(f"{path}: not a regular file (a pipe or a device): give a profile JSON file")
    if path.suffix == ".json" or path.is_file():
        model = CostModel(_read(path), str(path))
        if kv_room:
            _with_kv_room(model, str(path))
        model.path = str(path)
        return model
    for gpu_file in sorted((PROFILES_DIR / "gpus").glob("*.json")):
        model = str(name_or_path).removesuffix("-" + gpu_file.stem)
        model_file = PROFILES_DIR / "models" / f"{model}.json"
        if model != str(name_or_path) and model_file.is_file():
            spec = _spec(str(name_or_path), _read(model_file), gpu_file)
            model = CostModel(spec, f"{model_file} + {gpu_file}")
            return _with_kv_room(model, str(name_or_path)) if kv_room else model
    near = nearest_profiles(str(name_or_path))
    raise ProfileError(f"unknown profile {name_or_path!r}{f' (did you mean {near}?)' if near else ''}; "
                       f"shipped: {', '.join(list_profiles())}")


def nearest_profiles(name: str, n: int = 3) -> str:
    """The shipped names ``name`` may mean ("a or b"): those it begins (``llama2-13b-a100``: both
    A100 sizes), else the closest spellings, case aside (was: difflib alone, which offered
    llama2-13b-h200 for llama2-13b-a100)."""
    names, key = list_profiles(), name.strip().lower()
    near = [p for p in names if p.startswith(key)] if key else []
    near = near or difflib.get_close_matches(key, names, n=n)
    return " or ".join(near[:n])


def layer_weights(hidden: int, q_dim: int, kv_dim: int, mlp_mats: int, intermediate: int) -> int:
    """Weights of one decoder layer's linear maps: the attention projections (q, k, v, o) and
    the MLP's ``mlp_mats`` matrices."""
    return hidden * (2 * q_dim + 2 * kv_dim) + mlp_mats * hidden * intermediate


#: ``model_fields``: the Hugging Face model types whose layers the roofline describes: a gated
#: MLP of three matrices (gate, up, down), or OPT's two with biases and learned positions.
GATED_MLP_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "phi3"})
TWO_MATRIX_TYPES = frozenset({"opt"})


def model_fields(config: Any, dtype_bytes: int, n_params: int | None = None) -> dict[str, Any]:
    """A profile's ``model`` section from a decoder's Hugging Face config, for the model types of
    ``GATED_MLP_TYPES`` and ``TWO_MATRIX_TYPES``. ``n_params`` (default: counted from the config)
    sizes only the weights a KV-cache estimate subtracts. :class:`ProfileError` for what the
    roofline does not describe: other model types, mixture-of-experts layers, a config without
    these fields."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    what = type(c).__name__

    def field(*names: str) -> Any:
        return next((getattr(c, k) for k in names if getattr(c, k, None) is not None), None)

    if field("num_local_experts", "num_experts", "n_routed_experts"):
        raise ProfileError(f"{what}: mixture-of-experts layers are not in the cost model")
    kind = getattr(c, "model_type", None)
    opt = kind in TWO_MATRIX_TYPES
    if not opt and kind not in GATED_MLP_TYPES:
        raise ProfileError(f"{what}: model type {kind!r} is not one the cost model describes "
                           f"({', '.join(sorted(GATED_MLP_TYPES | TWO_MATRIX_TYPES))})")
    hidden, layers, heads = field("hidden_size"), field("num_hidden_layers"), field("num_attention_heads")
    inter, vocab = field("intermediate_size", "ffn_dim"), field("vocab_size")
    named = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
             "intermediate_size": inter, "vocab_size": vocab}
    if missing := [k for k, v in named.items() if not isinstance(v, int) or v < 1]:
        raise ProfileError(f"{what}: no usable {', '.join(missing)} in the model config")
    if opt and field("word_embed_proj_dim") not in (None, hidden):
        raise ProfileError(f"{what}: a projected embedding (word_embed_proj_dim) is not in the cost model")
    kv_heads = heads if (given := field("num_key_value_heads")) is None else given  # (was: 0 taken as
    if not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:  # not given; a reviewer's find)
        raise ProfileError(f"{what}: num_key_value_heads ({kv_heads!r}) must divide num_attention_heads ({heads})")
    head_dim = hidden // heads if (given := field("head_dim")) is None else given
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 1:
        raise ProfileError(f"{what}: head_dim ({head_dim!r}) must be a whole number >= 1")
    mats = 2 if opt else 3
    if n_params is None:
        q, kv = heads * head_dim, kv_heads * head_dim
        per_layer = layer_weights(hidden, q, kv, mats, inter) + 2 * hidden  # + the norms
        if opt:  # biases of the projections and the MLP, the norms' biases, learned positions
            per_layer += 2 * q + 2 * kv + inter + hidden + 2 * hidden
        n_params = vocab * hidden + layers * per_layer + hidden * (2 if opt else 1)
        n_params += ((field("max_position_embeddings") or 0) + 2) * hidden if opt else 0  # offset 2
        n_params += 0 if getattr(c, "tie_word_embeddings", opt) else vocab * hidden
    return {"n_params": int(n_params), "n_layers": layers, "hidden": hidden, "n_heads": heads,
            "n_kv_heads": kv_heads, "head_dim": head_dim, "intermediate": inter, "mlp_mats": mats,
            "vocab": vocab, "dtype_bytes": int(dtype_bytes),
            "source": {"architecture": f"{what} ({kind}) config: mlp_mats {mats} "
                       f"({'OPT-style MLP' if opt else 'a gated (SwiGLU) MLP'})"}}


def gpu_for(device_name: str, total_memory: int) -> str | None:
    """The shipped GPU file (``profiles/gpus/<name>.json``) that describes a device, by the name
    NVML gives it (``NVIDIA H100 80GB HBM3``) and its memory in bytes; None if none does. The
    files hold the SXM parts' datasheet numbers, so PCIe and NVL parts match none."""
    n = device_name.upper()
    if "PCIE" in n or "NVL" in n or "GH200" in n:
        gpu = None
    elif "H200" in n:
        gpu = "h200"
    elif "H100" in n and ("HBM3" in n or "SXM" in n):
        gpu = "h100-80gb"
    elif "A100" in n and "SXM" in n:
        gpu = "a100-80gb" if total_memory > 60 * 2**30 else "a100-40gb"
    else:
        return None
    # a MIG slice (or another memory size) is not the part the file describes
    held = _read(PROFILES_DIR / "gpus" / f"{gpu}.json")["gpu"]["hbm_bytes"] if gpu else 0
    return gpu if gpu and 0.9 * held <= total_memory <= 1.1 * held else None


def profile_for(config: Any, dtype_bytes: int, device_name: str, total_memory: int, name: str) -> CostModel:
    """The profile of a model (its Hugging Face config, :func:`model_fields`) on a device the
    shipped GPU files describe (:func:`gpu_for`), with that file's efficiency factors: what
    ``ECOSERVE_PROFILE=auto`` builds for the model vLLM serves. :class:`ProfileError` if either
    is not described."""
    gpu = gpu_for(device_name, total_memory)
    if gpu is None:
        shipped = ", ".join(p.stem for p in sorted((PROFILES_DIR / "gpus").glob("*.json")))
        raise ProfileError(f"no shipped GPU profile describes {device_name!r} with {total_memory / 2**30:.0f} "
                           f"GiB (shipped: {shipped}, whole SXM parts)")
    gpu_file = PROFILES_DIR / "gpus" / f"{gpu}.json"
    spec = _spec(f"{name}-{gpu}", model_fields(config, dtype_bytes), gpu_file)
    return _with_kv_room(CostModel(spec, f"{name} config + {gpu_file}"), spec["name"])


def _spec(name: str, model: dict[str, Any], gpu_file: Path) -> dict[str, Any]:
    """A profile: a model section and a GPU file (its ``gpu``, ``efficiency`` and, if any,
    ``token_budget`` and ``gpu_memory_utilization``)."""
    g = _read(gpu_file)
    _known_keys(g, GPU_FILE_KEYS, str(gpu_file))
    spec = {"name": name, "model": model, "gpu": g.get("gpu"), "efficiency": g.get("efficiency")}
    spec.update((k, g[k]) for k in ("token_budget", "gpu_memory_utilization") if k in g)
    return spec


def _with_kv_room(model: CostModel, origin: str, block_size: int = 16) -> CostModel:
    """Refuse a profile whose weights and activation reserve leave no room for one KV block at
    its own ``gpu_memory_utilization`` (``load_profile(kv_room=False)``: the server's settings
    decide, ``compare.Server.policy_kw``)."""
    if model.kv_blocks(block_size) < 1:
        g = model.spec["gpu"]
        raise ProfileError(f"{origin}: no room for a KV cache: weights ({model.weight_bytes_stored / 2**30:.3g} GiB) "
                           f"and the activation reserve fill {model.gpu_memory_utilization:g} x "
                           f"hbm_bytes ({g['hbm_bytes'] / 2**30:.3g} GiB)")
    return model


def _check_samples(arr: np.ndarray) -> None:
    """Refuse, naming the first, a sample no iteration could give: counts that are not whole
    numbers >= 0, no work, or seconds that are not a finite number > 0 (was: fitted silently,
    or scipy's "residuals are not finite")."""
    counts, seconds = arr[:, :4], arr[:, 4]
    bad = (~np.isfinite(arr).all(axis=1) | (counts < 0).any(axis=1) | (counts != np.round(counts)).any(axis=1)
           | (seconds <= 0) | ((counts[:, 0] == 0) & (counts[:, 2] == 0)))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"sample {i} ({', '.join(f'{v:g}' for v in arr[i])}): a sample is (prefill tokens, "
                         "prefill context, decoding requests, decode context, seconds): whole counts >= 0, "
                         "some prefill or decode, seconds > 0")


def fit_profile(samples: Iterable[Sample], base: CostModel | dict[str, Any], name: str,
                how: str | None = None) -> CostModel:
    """Least-squares fit of mfu, mbu and the overheads to measured iteration latencies.

    ``samples``: rows (prefill_tokens, prefill_ctx_tokens, decode_requests, decode_ctx_tokens,
    seconds). Minimises the relative error; the model's ``fit_error`` records the mean and
    max absolute relative error over the samples, and which factors no sample depends on
    (``not_fitted``: kept from ``base``) or ended at a bound of the search (``at_bound``).
    ``how``: what measured the samples, for each fitted factor's ``source``. The result holds
    no ``calibration`` section of ``base`` (it described other samples).
    """
    from scipy.optimize import least_squares

    model = base if isinstance(base, CostModel) else CostModel(base)
    arr = np.asarray(list(samples), dtype=float)
    if arr.ndim != 2 or arr.shape[1] != 5 or len(arr) < len(FIT_FIELDS):
        raise ValueError(f"need at least {len(FIT_FIELDS)} samples of 5 numbers each")
    _check_samples(arr)
    x_in, y = arr[:, :4], arr[:, 4]
    scale = np.array([1.0, 1.0, 1e-3, 1e-3, 1e-3])  # overheads are fitted in milliseconds

    def resid(x: np.ndarray) -> np.ndarray:
        return model.predict(x_in, dict(zip(FIT_FIELDS, x * scale, strict=True))) / y - 1.0

    e0 = model.spec["efficiency"]
    x0 = np.array([e0[f] for f in FIT_FIELDS]) / scale
    lo, hi = [1e-3, 1e-3, 0, 0, 0], [1.0, 1.0, *[MAX_OVERHEAD_S / 1e-3] * 3]
    sol = least_squares(resid, np.clip(x0, lo, hi), bounds=(lo, hi), x_scale="jac")
    # a factor no sample depends on keeps the base value, where putting it back changes no
    # residual (was: put back where the search had moved it out of play, a worse fit)
    x, base_r, not_fitted = sol.x.copy(), resid(sol.x), []
    for i, (f, col) in enumerate(zip(FIT_FIELDS, sol.jac.T, strict=True)):
        trial = x.copy()
        trial[i] = np.clip(x0[i], lo[i], hi[i])
        if not np.any(col) and np.array_equal(resid(trial), base_r):
            x, not_fitted = trial, [*not_fitted, f]
    at_bound = [f for f, a in zip(FIT_FIELDS, sol.active_mask, strict=True) if a and f not in not_fitted]
    # (at a bound too: its partner is free to take any value the bound leaves; was: left out, so
    # a per-request overhead beside an overhead at 0 was "fitted"; a reviewer's find)
    undetermined = _undetermined(sol.jac, [f not in not_fitted for f in FIT_FIELDS])
    rel = np.abs(resid(x))
    eff = {**e0, **{f: float(v) for f, v in zip(FIT_FIELDS, x * scale, strict=True)}}
    how = how or f"fit_profile to {len(y)} measured iterations (profile {name!r})"
    source = dict(e0.get("source", {}))
    for f, low, high in zip(FIT_FIELDS, lo, hi, strict=True):
        if f in not_fitted:
            source[f] = f"not fitted: none of the {len(y)} iterations of {how} depends on it; kept: " \
                        f"{source.get(f, 'the base profile')}"
        else:
            bound = f"; at the search's bound ({low if sol.x[FIT_FIELDS.index(f)] <= low else high:g})" \
                if f in at_bound else ""
            alone = ("; not determined: these iterations fit as well with other values of "
                     + ", ".join(undetermined)) if f in undetermined else ""
            source[f] = f"fitted by {how}{bound}{alone}"
    eff["source"] = source
    spec = {k: v for k, v in model.spec.items() if k != "calibration"}
    spec.update(name=name, efficiency=eff,
                fit={"n_samples": len(y), "mean_rel_error": float(rel.mean()), "max_rel_error": float(rel.max()),
                     "not_fitted": not_fitted, "at_bound": at_bound, "not_determined": undetermined})
    return CostModel(spec, name)


def _undetermined(jac: np.ndarray, free: Sequence[bool], tol: float = 1e-5) -> list[str]:
    """The free factors the samples cannot pin down: those in a direction of the fit's Jacobian
    (at the solution) that changes no residual, such as two overheads that every sample adds
    together, or one out of play (was: each reported as fitted; a reviewer's find). ``tol``: the
    Jacobian is a finite difference, so such a direction's singular value is about 1e-8 of the
    largest, not 0; a real calibration's smallest is above 1e-2 of it."""
    idx = [i for i, f in enumerate(free) if f]
    if not idx:
        return []
    cols = jac[:, idx]
    norms = np.linalg.norm(cols, axis=0)
    out = {idx[k] for k in np.flatnonzero(norms == 0)}
    live = [k for k in range(len(idx)) if norms[k] > 0]
    if live:
        s, vt = np.linalg.svd(cols[:, live] / norms[live], full_matrices=False)[1:]  # rows >= factors
        for row, sv in zip(vt, s, strict=True):
            if sv <= tol * s[0]:
                out |= {idx[live[k]] for k in np.flatnonzero(np.abs(row) > 1e-3)}
    return [FIT_FIELDS[i] for i in sorted(out)]
