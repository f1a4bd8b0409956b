"""The bundle commands: ``export`` (needs torch), ``predict`` and ``annotate`` (torch-free).

Registered on ``rlpredict.cli.app``. Heavy imports happen inside the commands: ``predict`` and
``annotate`` import only the runtime (numpy, onnxruntime, tokenizers; pyarrow for Parquet).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from rlpredict.buckets import range_label
from rlpredict.cli_boundary import (
    distinct_paths,
    err,
    in_range,
    log_line,
    nonblank_path,
    thread_count,
)
from rlpredict.json_file import dumps

ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", callback=nonblank_path("a bundle folder (written by `rlpredict export`)"),
    help="Bundle folder (default: $RLPREDICT_MODEL, else the shipped default bundle).")]
ReserveQOpt = Annotated[float | None, typer.Option(
    "--reserve-quantile", callback=in_range(0, 1, low_open=True),
    help="Reserve this quantile of the predicted length distribution (widens when unsure) "
         "instead of the predicted bucket's reservation.")]
MAX_MARGIN = 100  # runtime.MAX_MARGIN, written out: the CLI starts without numpy (a test checks they agree)
MarginOpt = Annotated[float, typer.Option(
    callback=in_range(0, MAX_MARGIN), help="Pad reservations by this fraction, in [0, 100]: reserve x (1 + margin), rounded up.")]
#: Up to this many prompts given as arguments, ``predict`` runs on one thread unless told.
FEW_PROMPTS = 8
ThreadsOpt = Annotated[int | None, typer.Option(
    callback=thread_count, help="ONNX Runtime threads, 1 to this machine's cores (default: one per core).")]
PredictThreadsOpt = Annotated[int | None, typer.Option(
    "--threads", callback=thread_count, help=f"ONNX Runtime threads, 1 to this machine's cores (default: one "
    f"for up to {FEW_PROMPTS} prompts given as arguments, else one per core).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace existing outputs.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def parse_quantiles(value: str | None) -> list[float] | None:
    """``--quantiles 0.5,0.9``: distinct levels in (0, 1)."""
    from rlpredict.serve.conformal import check_quantiles

    if value is None:
        return None
    if any(not v.strip() for v in value.split(",")):  # was: dropped without a word
        raise typer.BadParameter(f"{value!r}: an empty level (two commas, or one at an end)", param_hint="'--quantiles'")
    try:
        levels = [float(v) for v in value.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{value!r}: expected numbers like 0.5,0.9", param_hint="'--quantiles'") from None
    try:
        return list(check_quantiles(levels))
    except ValueError as e:
        raise typer.BadParameter(f"{value!r}: {e}", param_hint="'--quantiles'") from None


def _fail(msg: str) -> NoReturn:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def export(
    model: Annotated[Path, typer.Option("--model", help="Trained model folder (from `rlpredict train`).")],
    out: Annotated[Path, typer.Option("--out", help="Bundle folder to write.")],
    int8: Annotated[bool, typer.Option("--int8", help="Quantize to int8 (dynamic, per-channel); records its accuracy loss.")] = False,
    parity_data: Annotated[list[str] | None, typer.Option(
        "--parity-data", callback=distinct_paths, help="Chat-log file(s) with real prompts (and responses) for the parity "
                              "check (repeatable; default: the bundled ShareGPT/AlpacaEval sample).")] = None,
    parity_n: Annotated[int, typer.Option(min=1, max=1_000_000, help="Number of parity prompts (a seeded random subset).")] = 256,
    atol: Annotated[float | None, typer.Option(callback=in_range(0, 1e3, low_open=True), help="Max |logit difference| torch vs ONNX that passes parity (default 1e-3).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists (only a bundle folder a tool of ours wrote, and only once the new bundle passed parity).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Export a trained model to a torch-free bundle (ONNX + tokenizer + manifest), checking parity."""
    from rlpredict.train.export import export_bundle

    manifest = export_bundle(model, out, int8=int8, parity_data=[Path(p) for p in parity_data or ()] or None,
                             parity_n=parity_n,
                             atol=atol, force=force, log=log_line)
    if json_out:
        print(dumps({k: manifest[k] for k in ("name", "model", "parity", "quantization", "files")}, indent=2))
        return
    size = sum(f["bytes"] for f in manifest["files"].values())
    err.print(f"[green]bundle[/green] {escape(str(out))} ({manifest['model']['precision']}, {size / 2**20:.1f} MiB)")


def _read_stdin(jsonl: bool, single: bool, wants_generator: bool) -> tuple[list, list[str | None] | None, list[int]]:
    """The prompts on stdin, with ``--jsonl`` each line's generator (None: no line has one), and
    each prompt's line number (blank lines hold no prompt)."""
    from rlpredict.records import (
        MAX_ROW_BYTES,
        TRACE_FIELDS,
        RecordError,
        bounded_lines,
        decode_line,
        json_kind,
        parse_json,
    )
    from rlpredict.serve.annotate import BadRow, generator_of, request_of
    from rlpredict.untrusted_text import bad_utf8_at

    if single:
        raw = sys.stdin.buffer.read(MAX_ROW_BYTES + 1)  # was: any size, held whole
        if len(raw) > MAX_ROW_BYTES:
            _fail(f"stdin: a prompt over the {MAX_ROW_BYTES >> 20} MiB limit")
        try:
            data = raw.decode("utf-8-sig")  # a byte-order mark is not part of the first prompt
        except UnicodeDecodeError as e:
            line, byte = bad_utf8_at(raw, e)  # (was: counted from after a BOM)
            _fail(f"stdin: line {line}: not valid UTF-8 (byte {byte})")  # of the line, as a JSONL row's
        return ([data], None, [1]) if data.strip() else ([], None, [])
    # annotate's lines: split on "\n" only, each at most records.MAX_ROW_BYTES (was: all of
    # stdin held, a 100 MB line that annotate refuses taken)
    lines, held = [], 0
    for i, raw_line in enumerate(bounded_lines(sys.stdin.buffer), 1):
        try:
            line = decode_line(raw_line, i).rstrip("\r\n")
        except RecordError as e:
            _fail(f"stdin: line {i}: {e.reason}")
        if line.strip():
            lines.append((i, line))
            held += len(raw_line)
            if len(lines) > MAX_STDIN_PROMPTS or held > MAX_STDIN_BYTES:  # was: all held, printed at the end
                _fail(f"stdin: line {i}: more than {MAX_STDIN_PROMPTS:,} prompts or {MAX_STDIN_BYTES >> 20} MiB; "
                      "predict holds them to print one table: `rlpredict annotate FILE -o OUT` streams a file "
                      "of any size")
    numbers = [i for i, _ in lines]
    if not jsonl:
        return [line for _, line in lines], None, numbers
    out, gens = [], []
    twice = frozenset(TRACE_FIELDS.request_columns())
    for i, line in lines:
        try:
            row = parse_json(line, twice)  # annotate's rule: "not valid JSON (...)", deep nesting, a field twice
            if not isinstance(row, dict):
                raise BadRow(f"expected a JSON object, got {json_kind(row)}")
            out.append(request_of(row, TRACE_FIELDS))
            gens.append(generator_of(row, TRACE_FIELDS, wants_generator))
        except RecordError as e:
            _fail(f"stdin: line {i}: {e.reason}")
        except BadRow as e:
            _fail(f"stdin: line {i}: {e}")
    return out, gens if any(g is not None for g in gens) else None, numbers


#: Prompts, and bytes of them, ``predict`` takes from stdin; more is ``annotate``'s job (it streams).
MAX_STDIN_PROMPTS = 10_000
MAX_STDIN_BYTES = 256 << 20


def _reads(spec: Any) -> str:
    """Where a bundle reads the prompt, for notes."""
    return ("any message" if spec.mode == "history" else
            "the last user message: a blank prompt, only a system turn, an unknown role, an image alone")


def _shown(request: Any, width: int = 48) -> str:
    """What ``predict``'s table shows of a request: the last user message (the turn answered,
    which the bundle reads in either input mode; was: the last message, an assistant's reply
    that a ``last_user`` bundle never reads), every
    character the terminal would act on written as its escape (was: ESC went through, so a
    logged prompt could clear or recolour the screen); a newline as a space; at most ``width``
    characters, the last "…" where more were cut (only those are escaped: was, the whole prompt,
    26 s and 1.9 GB for 20 M zero-width spaces)."""
    from rlpredict.inputs import last_user_message
    from rlpredict.records import TRACE_MESSAGES, RecordError, parse_messages

    if isinstance(request, str):
        text = request
    else:
        try:
            text = last_user_message(parse_messages(list(request), "messages", TRACE_MESSAGES)) if request else ""
        except (RecordError, TypeError):
            text = ""
    text = text[:width + 1].replace("\n", " ")  # each character shows as one or more
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return shown if len(shown) <= width else shown[:width - 1] + "…"


def predict(
    texts: Annotated[list[str] | None, typer.Argument(metavar="PROMPT", help="Prompts (default: one per line on stdin).")] = None,
    model: ModelOpt = None,
    generator: Annotated[str | None, typer.Option(help="Served model's name (for bundles trained with the generator as input).")] = None,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="stdin lines are JSON objects with 'prompt' or 'messages' (and 'generator' or 'model', which win over --generator).")] = False,
    single: Annotated[bool, typer.Option("--single", help="All of stdin is one prompt.")] = False,
    reserve_quantile: ReserveQOpt = None,
    margin: MarginOpt = 0.0,
    threads: PredictThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Predict the response-length bucket, point estimate and reservation of prompts."""
    from rlpredict.records import names_nothing, no_generator_note
    from rlpredict.serve.runtime import Predictor, lacks_user_text
    from rlpredict.untrusted_text import is_valid_unicode

    if jsonl and single:
        raise typer.BadParameter("reads one prompt; --jsonl reads one JSON object per line: pass one",
                                 param_hint="'--single'")
    if texts and (jsonl or single):
        raise typer.BadParameter("reads stdin; the prompts given as arguments would be ignored",
                                 param_hint="'--jsonl'" if jsonl else "'--single'")
    for i, t in enumerate(texts or (), 1):
        if not is_valid_unicode(t):  # undecodable bytes in argv arrive as lone surrogates
            _fail(f"prompt argument {i}: not valid UTF-8")
        if not t.strip():  # as blank stdin: most often an unset shell variable ("$PROMPT")
            _fail(f"prompt argument {i}: empty (or only blank space)")
    if generator is not None and not is_valid_unicode(generator):
        raise typer.BadParameter("not valid UTF-8", param_hint="'--generator'")
    if names_nothing(generator):  # "" or blank space: as a blank field, no model named (and said below;
        generator = None  # was: "   " taken as a model's name, without a word)
    if not texts and (sys.stdin is None or sys.stdin.isatty()):  # None: started with stdin closed
        _fail("give TEXT arguments or pipe prompts on stdin")
    if threads is None and texts and len(texts) <= FEW_PROMPTS:
        # a few prompts run faster on one thread than the second session and its probes load
        # (a reviewer's median `predict "prompt"`: 1.37 s against 2.0 s with one per core)
        threads = 1
    p = Predictor.load(model, reserve_quantile=reserve_quantile, margin=margin, threads=threads)
    if texts:
        requests, line_gens, numbers = list(texts), None, list(range(1, len(texts) + 1))
    else:
        requests, line_gens, numbers = _read_stdin(jsonl, single, p.input_spec.include_generator)
        blank = (numbers[-1] if numbers else 0) - len(numbers)  # blank lines before the last prompt
        if blank:
            typer.echo(f"note: skipped {blank} blank stdin line(s); '#' is each prompt's line number", err=True)
        if not requests:
            _fail("stdin: no prompt (empty, or only blank space)")
    # a line's own generator wins; --generator names it for the lines without one
    gens = generator if line_gens is None else [g or generator for g in line_gens]
    preds = p.predict(requests, gens)
    unknown = sum(not g for g in gens) if isinstance(gens, list) else 0 if gens else len(requests)
    if p.input_spec.include_generator and unknown:  # said, as annotate says it
        typer.echo("note: " + no_generator_note(f"{unknown} prompt(s)", "--generator, or 'generator' or 'model' in "
                                                "--jsonl lines"), err=True)
    if no_user := sum(lacks_user_text(r, p.input_spec) for r in requests):  # said, as annotate says it
        typer.echo(f"note: {no_user} request(s) with no text where this bundle reads it ({_reads(p.input_spec)}): "
                   "predicted as an empty prompt, which training never saw", err=True)
    edges = p.scheme.edges
    if json_out:
        key = "argument" if texts else "line"
        rows = [{key: n, "input": r, "rl_bucket": x.bucket, "rl_pred_tokens": x.pred_tokens,
                 "rl_reserve_tokens": x.reserve_tokens, "bucket_range": range_label(edges, x.bucket),
                 "probs": [round(float(v), 5) for v in x.probs]}
                for n, r, x in zip(numbers, requests, preds, strict=True)]
        doc = {"model": str(p.bundle.path), "predictions": rows}
        try:
            print(dumps(doc, ensure_ascii=False, indent=2))
        except UnicodeEncodeError:  # a terminal that cannot show the prompts' text: JSON's escapes,
            print(dumps(doc, indent=2))  # the same document (was: an error after every prediction)
        return
    from rich.table import Table
    from rich.text import Text

    reserve = ("the predicted bucket's reservation" if p.reserve_quantile is None
               else f"the distribution's {p.reserve_quantile:g} quantile")
    table = Table(title=escape(f"{p.bundle.name} ({p.bundle.precision}; RL in {p.bundle.rl_tokenizer} tokens)"),
                  caption=f"bucket, p: the most likely bucket and its probability; pred: the median of the "
                          "whole predicted distribution (it may lie outside that bucket); reserve: "
                          f"{reserve}{' plus the margin' if p.margin else ''}")
    for col in ("#", "bucket", "range", "pred", "reserve", "p"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("prompt")
    for n, r, x in zip(numbers, requests, preds, strict=True):
        table.add_row(str(n), str(x.bucket), range_label(edges, x.bucket), str(x.pred_tokens),
                      str(x.reserve_tokens), f"{x.confidence:.2f}",
                      Text(_shown(r)))  # as typed (escape() kept "a\\[b" as "a[b")
    Console().print(table)


def annotate(
    input: Annotated[Path, typer.Argument(metavar="INPUT", help="Trace: .jsonl[.gz], .csv[.gz] or .parquet (with --engine ray: JSONL(.gz) or Parquet, or a folder of them).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Annotated trace, same format as INPUT (a folder for a folder; written atomically).")],
    model: ModelOpt = None,
    prompt_field: Annotated[str, typer.Option(help="Field holding the prompt string.")] = "prompt",
    messages_field: Annotated[str, typer.Option(help="Field holding OpenAI-style messages (wins over the prompt when both are set).")] = "messages",
    generator_field: Annotated[str | None, typer.Option(help="Field naming the served model (used by bundles trained with it; default: 'generator', else 'model', as training reads it).")] = None,
    drop_final_assistant: Annotated[bool, typer.Option(help="Drop a trailing assistant message (logs that store the response in the conversation).")] = False,
    on_error: Annotated[Literal["fail", "skip"], typer.Option("--on-error", help="Bad rows: 'fail' (stop with the line number) or 'skip' (write them to the rejects file).")] = "fail",
    rejects: Annotated[Path | None, typer.Option(help="Rejects file for --on-error skip (default: beside OUTPUT, its name less the format suffixes + .rejects.jsonl: run.05.csv.gz -> run.05.rejects.jsonl).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, max=4096, help="Prompts per inference call (predictions do not depend on it; default 32; local engine).")] = None,
    chunk_rows: Annotated[int, typer.Option(min=1, max=1_000_000, help="Rows read, predicted and written at a time (bounds memory).")] = 2048,
    reserve_quantile: ReserveQOpt = None,
    margin: MarginOpt = 0.0,
    threads: Annotated[int | None, typer.Option(min=1, max=4096, help="ONNX Runtime threads, 1 to this machine's cores (default: one per core); with --engine ray, per worker (default: 4, at most the largest node's CPUs; with --num-workers N, the cluster's CPUs / N).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress on stderr: a bar on a terminal, else a line every 30 s.")] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT and the rejects file if they exist.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    engine: Annotated[Literal["local", "ray"], typer.Option("--engine", help="'local': this process; 'ray': predictor actors on a Ray cluster (needs Ray: the project's 'ray' extra; --threads is then per worker).")] = "local",
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="With --engine ray: the cluster to attach to ('auto', HOST:PORT or 'local'; default: $RAY_ADDRESS if set, else start a local Ray and stop it at the end).")] = None,
    num_workers: Annotated[int | None, typer.Option("--num-workers", min=1, max=100_000, help="With --engine ray: predictor actors (default: the cluster's CPUs / threads per worker).")] = None,
    quantiles: Annotated[str | None, typer.Option("--quantiles", help="Also add the bundle's calibrated quantiles (`rlpredict calibrate`), e.g. 0.5,0.9 -> rl_q50_tokens, rl_q90_tokens (local engine).")] = None,
) -> None:
    """Add rl_bucket, rl_pred_tokens and rl_reserve_tokens to every row of a request trace."""
    from rlpredict.records import GENERATOR_FIELDS, Fields, no_generator_note
    from rlpredict.serve.annotate import ANNOTATE_TOOL, COLUMNS, annotate_file, column_name
    from rlpredict.serve.runtime import Predictor

    fields = Fields.trace(prompt=prompt_field, messages=messages_field,
                          generator=generator_field if generator_field is not None else GENERATOR_FIELDS,
                          drop_final_assistant=drop_final_assistant)
    levels = parse_quantiles(quantiles)
    written = {*COLUMNS, *(column_name(q) for q in levels or ())}
    for option, name in (("--prompt-field", prompt_field), ("--messages-field", messages_field),
                         ("--generator-field", generator_field)):
        if name is not None and name in written:
            raise typer.BadParameter(f"{name!r} is a column annotate writes (its predictions would "
                                     "replace what it read); name the input's field", param_hint=f"'{option}'")
    if rejects is not None and on_error != "skip":
        raise typer.BadParameter("is written only with --on-error skip (fail mode stops at the first "
                                 "bad row)", param_hint="'--rejects'")
    if engine == "ray":
        from rlpredict.serve.annotate_ray import annotate_path, import_ray

        if levels is not None:
            raise typer.BadParameter("not yet with --engine ray; use --engine local", param_hint="--quantiles")
        if batch_size is not None:  # was: ignored
            raise typer.BadParameter("only with --engine local (Ray workers predict a chunk at a time)",
                                     param_hint="'--batch-size'")

        import_ray()  # one line on how to install it, before anything else
        from rlpredict.serve.bundle import load_bundle

        spec = load_bundle(model, verify=False).input
        s = annotate_path(input, output, model, fields=fields, on_error=on_error, rejects=rejects,
                          chunk_rows=chunk_rows, num_workers=num_workers, threads=threads,
                          reserve_quantile=reserve_quantile, margin=margin, ray_address=ray_address,
                          progress=progress and not json_out, force=force,
                          log=None if json_out else log_line, owner=ANNOTATE_TOOL)
    else:
        for option, value in (("--ray-address", ray_address), ("--num-workers", num_workers)):
            if value is not None:
                raise typer.BadParameter("only with --engine ray", param_hint=f"'{option}'")
        try:  # this machine's cores (with Ray, the cluster's nodes decide: plan_workers)
            thread_count(threads)
        except typer.BadParameter as e:
            raise typer.BadParameter(str(e), param_hint="'--threads'") from None
        p = Predictor.load(model, reserve_quantile=reserve_quantile, margin=margin, threads=threads,
                           batch_size=batch_size or 32)
        spec = p.input_spec
        s = annotate_file(p, input, output, fields=fields, on_error=on_error, rejects=rejects,
                          chunk_rows=chunk_rows, progress=progress and not json_out, force=force,
                          quantiles=levels or (), owner=ANNOTATE_TOOL)
    if json_out:
        print(dumps(s.to_dict(), indent=2))
        return
    msg = (f"in {s.rows_in} = out {s.rows_out} + rejected {s.rows_rejected} rows "
           f"in {s.seconds:.1f} s ({s.rows_per_s:.0f} rows/s) -> {s.output}")
    if s.rejects:
        msg += f"; rejects: {s.rejects}"
    err.print(escape(msg), highlight=False)
    if s.earlier_rejects:
        err.print(f"  {escape(s.earlier_rejects)} is an earlier run's rejects file, not this output's (this run "
                  "stops at a bad row and writes none; it was left as it was)", highlight=False)
    if s.rows_replaced:
        err.print(f"  {s.rows_replaced} row(s) already had rl_* fields: their values were replaced by this "
                  "bundle's predictions", highlight=False)
    for name, n in s.stale_fields.items():
        err.print(f"  {n} row(s) keep {name} from an earlier annotation: this run did not write it, so it is not "
                  "this bundle's prediction (--quantiles replaces it)", highlight=False)
    if s.rows_without_user_text:
        err.print(f"  {s.rows_without_user_text} row(s) have no text where this bundle reads it "
                  f"({_reads(spec)}): predicted as an empty prompt, which training never saw", highlight=False)
    if s.rows_without_generator:
        named = " or ".join(repr(f) for f in fields.generator)
        err.print("  " + escape(no_generator_note(f"{s.rows_without_generator} row(s)", f"field {named}")),
                  highlight=False)
    for reason, n in list(s.reasons.items())[:5]:
        err.print(f"  {n} x {escape(reason)}", highlight=False)
