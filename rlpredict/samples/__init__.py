"""Small samples of real data shipped with the package (see README.md here for sources and licenses)."""

from pathlib import Path

HERE = Path(__file__).parent
SAMPLE_FILES: dict[str, Path] = {
    "sharegpt": HERE / "sharegpt_sample.jsonl.gz",
    "alpaca_eval": HERE / "alpaca_sample.jsonl.gz",
}
