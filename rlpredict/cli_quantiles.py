"""The calibration commands: ``calibrate`` (conformal quantiles into a bundle) and ``drift``
(new logs against a bundle). Torch-free: the bundle's ONNX model predicts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.markup import escape

from rlpredict.cli_boundary import at_least, distinct_paths, err, in_range, log_line, say_skipped
from rlpredict.cli_bundle import ForceOpt, JsonOpt, ModelOpt, ThreadsOpt, parse_quantiles
from rlpredict.json_file import dumps
from rlpredict.splits import MAX_TEST_FRAC

# str, not Path: distinct_paths refuses a blank one (as a Path, "" was the current folder)
DataOpt = Annotated[list[str], typer.Option("--data", callback=distinct_paths, help="Chat logs with responses (repeatable).")]
OnErrorOpt = Annotated[Literal["fail", "skip"], typer.Option(
    "--on-error", help="Bad rows: 'fail' (stop with file:line) or 'skip' (count and report).")]


def calibrate(
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", help="Calibrated bundle folder to write (never the input bundle).")],
    model: ModelOpt = None,
    quantiles: Annotated[str, typer.Option(help="Quantile levels to calibrate, comma-separated, each in (0, 1).")] = "0.5,0.9",
    split: Annotated[Literal["test", "all"], typer.Option(
        help="'test': the held-out side of the split the bundle recorded (training data is never "
             "used); 'all': every row (logs the model never saw).")] = "test",
    test_frac: Annotated[float | None, typer.Option(callback=in_range(0, MAX_TEST_FRAC, low_open=True), help=f"Training split's test fraction, in (0, {MAX_TEST_FRAC}] as training takes it, if the bundle does not record it (a different one is refused).")] = None,
    seed: Annotated[int | None, typer.Option(min=0, max=2**32 - 1, help="Training split's seed, if the bundle does not record it (a different one is refused); with --split all, the seed of the fit/check division (default 0).")] = None,
    check_frac: Annotated[float, typer.Option(callback=in_range(0.01, 0.99), help="Share of the held-out prompts kept to check coverage.")] = 0.5,
    min_group: Annotated[int, typer.Option(callback=at_least(1), help="Predicted buckets with fewer calibration prompts share one offset (the rest group's).")] = 100,
    confidence: Annotated[float | None, typer.Option(callback=in_range(0, 1, low_open=True, high_open=True), help="Also bound the calibration draw, in (0, 1): coverage >= q except with probability 1 - CONFIDENCE (e.g. 0.9); costs wider quantiles.")] = None,
    on_error: OnErrorOpt = "fail",
    threads: ThreadsOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Add split-conformal quantiles (coverage >= q on exchangeable data) to a bundle."""
    from rlpredict.serve.bundle import default_bundle_path
    from rlpredict.serve.calibrate import calibrate_bundle, markdown

    report = calibrate_bundle(model or default_bundle_path(), data, out, quantiles=parse_quantiles(quantiles) or (),
                              split=split, test_frac=test_frac, seed=seed, check_frac=check_frac,
                              min_group=min_group, confidence=confidence, on_error=on_error, threads=threads, force=force,
                              log=log_line)
    print(dumps(report, indent=2) if json_out else markdown(report))


def drift(
    data: DataOpt,
    model: ModelOpt = None,
    max_tv: Annotated[float, typer.Option(callback=in_range(0, 1, low_open=True), help="Largest total variation distance between bucket distributions that is not drift.")] = 0.15,
    tolerance: Annotated[float, typer.Option(callback=in_range(0, 1), help="Coverage may fall this far below q (beyond sampling noise).")] = 0.02,
    min_rows: Annotated[int, typer.Option(callback=at_least(1), help="Groups with fewer rows are reported but never decide.")] = 200,
    on_error: OnErrorOpt = "fail",
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Compare new logs with what the bundle was trained and calibrated on; exit 3 on drift.

    Exit 4 when nothing was judged: the logs hold fewer than --min-rows rows, or so few
    conversations and prompts (or such loose bounds) that no bound of all rows could break and
    no group broke one."""
    from rlpredict.serve.drift import DRIFT_EXIT, TOO_FEW_EXIT, DriftBounds, drift_report, markdown

    report = drift_report(model, data, bounds=DriftBounds(max_tv=max_tv, tolerance=tolerance, min_rows=min_rows),
                          on_error=on_error, threads=threads)
    if json_out:
        print(dumps(report, indent=2))
    else:
        print(markdown(report))
        err.print(escape(report["load"]), highlight=False)  # rows read, samples, and what was skipped
        say_skipped(report["skipped_examples"])
        err.print(escape(f"verdict: {report['verdict']}" + "".join(f"\n  {r}" for r in report["reasons"])), highlight=False)
        for note in report["notes"]:  # label shift, small groups: said, not a verdict
            fits = report["verdict"] == "ok" and "shifted by TV" in note  # (was: said under a drift verdict too)
            err.print(escape(f"note: {note}" + (" (not drift while the predictions still fit)" if fits else "")),
                      highlight=False)
    if report["verdict"] != "ok":
        raise typer.Exit(DRIFT_EXIT if report["verdict"] == "drift" else TOO_FEW_EXIT)
