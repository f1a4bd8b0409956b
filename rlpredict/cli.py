"""``rlpredict``: train, evaluate, export and serve response-length predictors.

Thin commands over the Python API; heavy imports (torch, sklearn) happen inside the commands
that need them, so ``rlpredict predict`` stays torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console

from rlpredict.cli_boundary import BoundaryGroup, in_range, root_callback
from rlpredict.json_file import dumps

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, cls=BoundaryGroup,
                  callback=root_callback("rlpredict"))
err = Console(stderr=True)

OnErrorOpt = Annotated[Literal["fail", "skip"], typer.Option(
    "--on-error", help="Bad rows: 'fail' (stop with file:line) or 'skip' (count and report).")]


ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Replace OUT if it exists (only a folder that a tool of ours wrote entirely).")]


@app.command()
def train(
    data: Annotated[list[Path] | None, typer.Option("--data", help="Chat-log file or folder (repeatable); overrides the config's `data`.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output model folder (refused if it exists, unless --force).")] = Path("runs/model"),
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML (or YAML) file with TrainConfig settings.")] = None,
    max_rows: Annotated[int | None, typer.Option(min=1, help="Subsample the training side to N samples.")] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Stop after N optimizer steps.")] = None,
    on_error: OnErrorOpt = "fail",
    force: ForceOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the training summary as JSON.")] = False,
) -> None:
    """Fine-tune an encoder to predict the response-length bucket of a prompt."""
    from rlpredict.config import TrainConfig
    from rlpredict.train import check_output, prepare
    from rlpredict.train import train as run_train

    cfg = TrainConfig.load(config) if config else TrainConfig()
    if data:
        cfg.data = [str(p) for p in data]
    if max_rows is not None:
        cfg.max_rows = max_rows
    if max_steps is not None:
        cfg.max_steps = max_steps
    cfg.on_error = on_error  # type: ignore[assignment]
    cfg.validate("options")
    check_output(cfg, out, force)  # before the data is read and the model trained
    prep = prepare(cfg)
    err.print(f"data: {prep.report.summary()}; train {len(prep.train)} / held out {len(prep.test)}", highlight=False)
    for line in prep.report.examples:
        err.print(f"  [yellow]skipped[/yellow] {line}", highlight=False)
    empty = [k for k, c in enumerate(prep.scheme.counts) if not c]
    if empty:
        err.print(f"  [yellow]warning[/yellow] no training response falls in bucket(s) {empty}: "
                  "the model cannot learn to predict them", highlight=False)
    summary = run_train(cfg, out, prepared=prep, progress=not json_out, force=force)
    if json_out:
        print(dumps(summary, indent=2))
    else:
        err.print(f"[green]saved[/green] {out}  ({summary['steps']} steps, loss {summary['loss_first']:.3f} -> "
                  f"{summary['loss_last']:.3f}, {summary['examples_per_second']} ex/s)", highlight=False)


@app.command("eval")
def eval_cmd(
    model: Annotated[Path, typer.Option("--model", help="Model folder written by `rlpredict train`.")],
    data: Annotated[list[Path], typer.Option("--data", help="Data file or folder (repeatable).")],
    split: Annotated[str, typer.Option(help="'test': the model's held-out groups of DATA (baselines train on the rest); 'all': every row.")] = "test",
    baseline_data: Annotated[list[Path] | None, typer.Option(help="With --split all: data to train the baselines on.")] = None,
    baselines: Annotated[str, typer.Option(help="Comma-separated baselines: constant,prompt_length,tfidf_ridge,tfidf_logreg (empty: none).")] = "constant,prompt_length,tfidf_ridge,tfidf_logreg",
    out: Annotated[Path | None, typer.Option("--out", help="Report folder (default: MODEL/eval; refused if it exists, unless --force).")] = None,
    reserve_quantile: Annotated[float, typer.Option(callback=in_range(0, 1, low_open=True), help="Quantile of the predicted length distribution for the q-reservation columns, in (0, 1].")] = 0.9,
    on_error: OnErrorOpt = "fail",
    force: ForceOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Score a model and the baselines on the same split: accuracy, MAE, tau, reservation coverage."""
    from rlpredict.baselines import BASELINES
    from rlpredict.evaluate import evaluate, markdown_report, write_report
    from rlpredict.model_meta import ModelMeta
    from rlpredict.outputs import check_new_dir, check_paths

    names = [b for b in baselines.split(",") if b]
    unknown = [b for b in names if b not in BASELINES]
    if unknown:
        raise typer.BadParameter(f"unknown baseline(s) {unknown}; choose from {list(BASELINES)}",
                                 param_hint="--baselines")
    out = out or model / "eval"
    check_paths([model, *data, *(baseline_data or ())], [("--out", out)])
    check_new_dir(out, force=force, option="--out")
    report, probs, test = evaluate(model, data, split=split, baselines=names, baseline_data=baseline_data or (),
                                   on_error=on_error, reserve_quantile=reserve_quantile, progress=not json_out)
    for line in report["baselines_skipped"]:
        err.print(f"[yellow]baseline skipped[/yellow] {line}", highlight=False)
    write_report(report, probs, test, ModelMeta.load(model).buckets, out, force=force)
    if json_out:
        print(dumps(report, indent=2))
    else:
        print(markdown_report(report))
        err.print(f"[green]report written to[/green] {out}", highlight=False)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's model and report (refused if it exists, unless --force).")] = Path("runs/demo"),
    steps: Annotated[int, typer.Option(min=1, max=100_000, help="Training steps (batch 16).")] = 60,
    force: ForceOpt = False,
) -> None:
    """The main job on the bundled real-data sample: train a small predictor, evaluate it vs the baselines."""
    from rlpredict.config import TrainConfig
    from rlpredict.evaluate import evaluate, markdown_report, write_report
    from rlpredict.model_meta import ModelMeta
    from rlpredict.outputs import output_dir
    from rlpredict.samples import SAMPLE_FILES
    from rlpredict.train import train as run_train

    data = [str(p) for p in SAMPLE_FILES.values()]
    cfg = TrainConfig(data=data, max_steps=steps, batch_size=16, include_generator=True, test_frac=0.25,
                      lr=1e-4, max_length=96)
    with output_dir(out, force=force, tool="rlpredict demo") as tmp:
        err.print(f"[bold]1/2 train[/bold] all-MiniLM-L6-v2 on {', '.join(SAMPLE_FILES)} ({steps} steps, RL in Llama-3 tokens)")
        summary = run_train(cfg, tmp / "model")
        err.print(f"    loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}, {summary['examples_per_second']} ex/s")
        err.print("[bold]2/2 evaluate[/bold] vs constant, prompt-length, TF-IDF baselines on the held-out 25% (by prompt/conversation)")
        report, probs, test = evaluate(tmp / "model", data, progress=True)
        write_report(report, probs, test, ModelMeta.load(tmp / "model").buckets, tmp / "report")
    print(markdown_report(report))
    err.print(f"[green]report written to[/green] {out / 'report'}/report.md (confusion matrices: confusion_*.png)",
              highlight=False)


from rlpredict import cli_bundle  # noqa: E402  (bundle commands: export, predict, annotate)

app.command("export")(cli_bundle.export)
app.command("predict")(cli_bundle.predict)
app.command("annotate")(cli_bundle.annotate)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
