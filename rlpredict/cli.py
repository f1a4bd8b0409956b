"""``rlpredict``: train, evaluate, export and serve response-length predictors.

Thin commands over the Python API; heavy imports (torch, sklearn) happen inside the commands
that need them, so ``rlpredict predict`` stays torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
err = Console(stderr=True)

OnErrorOpt = Annotated[str, typer.Option("--on-error", help="Bad rows: 'fail' (stop with file:line) or 'skip' (count and report).")]


def _fail(msg: str) -> None:
    err.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(2)


@app.command()
def train(
    data: Annotated[list[Path] | None, typer.Option("--data", help="Chat-log file or folder (repeatable); overrides the config's `data`.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output model folder.")] = Path("runs/model"),
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML (or YAML) file with TrainConfig settings.")] = None,
    max_rows: Annotated[int | None, typer.Option(help="Subsample the training side to N samples.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after N optimizer steps.")] = None,
    on_error: OnErrorOpt = "fail",
    json_out: Annotated[bool, typer.Option("--json", help="Print the training summary as JSON.")] = False,
) -> None:
    """Fine-tune an encoder to predict the response-length bucket of a prompt."""
    from rlpredict.config import TrainConfig
    from rlpredict.data import DataError
    from rlpredict.train import prepare
    from rlpredict.train import train as run_train

    try:
        cfg = TrainConfig.load(config) if config else TrainConfig()
        if data:
            cfg.data = [str(p) for p in data]
        if max_rows is not None:
            cfg.max_rows = max_rows
        if max_steps is not None:
            cfg.max_steps = max_steps
        cfg.on_error = on_error  # type: ignore[assignment]
        prep = prepare(cfg)
    except (DataError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    err.print(f"data: {prep.report.summary()}; train {len(prep.train)} / held out {len(prep.test)}")
    for line in prep.report.examples:
        err.print(f"  [yellow]skipped[/yellow] {line}")
    summary = run_train(cfg, out, prepared=prep, progress=not json_out)
    if json_out:
        print(json.dumps(summary, indent=2))
    else:
        err.print(f"[green]saved[/green] {out}  ({summary['steps']} steps, loss {summary['loss_first']:.3f} -> "
                  f"{summary['loss_last']:.3f}, {summary['examples_per_second']} ex/s)")


@app.command("eval")
def eval_cmd(
    model: Annotated[Path, typer.Option("--model", help="Model folder written by `rlpredict train`.")],
    data: Annotated[list[Path], typer.Option("--data", help="Data file or folder (repeatable).")],
    split: Annotated[str, typer.Option(help="'test': the model's held-out groups of DATA (baselines train on the rest); 'all': every row.")] = "test",
    baseline_data: Annotated[list[Path] | None, typer.Option(help="With --split all: data to train the baselines on.")] = None,
    baselines: Annotated[str, typer.Option(help="Comma-separated baselines: constant,prompt_length,tfidf_ridge,tfidf_logreg (empty: none).")] = "constant,prompt_length,tfidf_ridge,tfidf_logreg",
    out: Annotated[Path | None, typer.Option("--out", help="Report folder (default: MODEL/eval).")] = None,
    reserve_quantile: Annotated[float, typer.Option(help="Quantile of the predicted length distribution for the q-reservation columns.")] = 0.9,
    on_error: OnErrorOpt = "fail",
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Score a model and the baselines on the same split: accuracy, MAE, tau, reservation coverage."""
    from rlpredict.baselines import BASELINES
    from rlpredict.data import DataError
    from rlpredict.evaluate import evaluate, markdown_report, write_report
    from rlpredict.model_meta import ModelMeta

    names = [b for b in baselines.split(",") if b]
    unknown = [b for b in names if b not in BASELINES]
    if unknown:
        _fail(f"unknown baseline(s) {unknown}; choose from {list(BASELINES)}")
    try:
        report, probs, test = evaluate(model, data, split=split, baselines=names, baseline_data=baseline_data or (),
                                       on_error=on_error, reserve_quantile=reserve_quantile, progress=not json_out)
    except (DataError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    out = out or model / "eval"
    write_report(report, probs, test, ModelMeta.load(model).buckets, out)
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        print(markdown_report(report))
        err.print(f"[green]report written to[/green] {out}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's model and report.")] = Path("runs/demo"),
    steps: Annotated[int, typer.Option(help="Training steps (batch 16).")] = 60,
) -> None:
    """The main job on the bundled real-data sample: train a small predictor, evaluate it vs the baselines."""
    from rlpredict.config import TrainConfig
    from rlpredict.evaluate import evaluate, markdown_report, write_report
    from rlpredict.model_meta import ModelMeta
    from rlpredict.samples import SAMPLE_FILES
    from rlpredict.train import train as run_train

    data = [str(p) for p in SAMPLE_FILES.values()]
    cfg = TrainConfig(data=data, max_steps=steps, batch_size=16, include_generator=True, test_frac=0.25,
                      lr=1e-4, max_length=96)
    err.print(f"[bold]1/2 train[/bold] all-MiniLM-L6-v2 on {', '.join(SAMPLE_FILES)} ({steps} steps, RL in Llama-3 tokens)")
    summary = run_train(cfg, out / "model")
    err.print(f"    loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}, {summary['examples_per_second']} ex/s")
    err.print("[bold]2/2 evaluate[/bold] vs constant, prompt-length, TF-IDF baselines on the held-out 25% (by prompt/conversation)")
    report, probs, test = evaluate(out / "model", data, progress=True)
    write_report(report, probs, test, ModelMeta.load(out / "model").buckets, out / "report")
    print(markdown_report(report))
    err.print(f"[green]report written to[/green] {out / 'report'}/report.md (confusion matrices: confusion_*.png)")


from rlpredict import cli_bundle  # noqa: E402  (bundle commands: export, predict, annotate)

app.command("export")(cli_bundle.export)
app.command("predict")(cli_bundle.predict)
app.command("annotate")(cli_bundle.annotate)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
