"""Training on ``transformers.Trainer``: 2-process DDP (gloo, CPU) matches 1 process, resume
continues an interrupted run exactly, checkpoints follow the output-safety rules, CLI flags are
checked at parse time and override the config file.

A tiny randomly initialised BERT encoder (2 layers of width 32, the real MiniLM tokenizer,
dropout off so runs are deterministic) keeps each run to a few seconds on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from transformers import TrainerCallback
from typer.testing import CliRunner

from rlpredict.cli import app
from rlpredict.outputs import OWNER_FILE, OutputError
from rlpredict.samples import SAMPLE_FILES
from rlpredict.train.config import TrainConfig
from rlpredict.train.trainer import LengthGroupedSampler, latest_checkpoint, prepare, train

DATA = [str(SAMPLE_FILES["sharegpt"])]
#: Largest |loss(2 processes) - loss(1 process)| allowed at any step. Both runs see the same
#: global batches (the sampler orders global batches; accelerate hands each process a slice)
#: and DDP averages equal-sized shares, so only float summation order differs (~1e-7 seen).
DDP_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    import torch
    import transformers

    from rlpredict.train.encoders import encoder_path

    src = encoder_path()
    out = tmp_path_factory.mktemp("tiny_encoder")
    base = transformers.BertConfig.from_pretrained(src)
    cfg = transformers.BertConfig(
        vocab_size=base.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=base.pad_token_id,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def tiny_cfg(encoder: Path, **kw) -> TrainConfig:
    base = dict(data=DATA, encoder=str(encoder), max_rows=32, batch_size=8, max_steps=6, max_length=32,
                lr=1e-3, head_lr=1e-2, warmup_ratio=0.0, eval_rows=16, eval_steps=2, seed=3, threads=1,
                buckets="quantile:4")
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def prepared(tiny_encoder):
    return prepare(tiny_cfg(tiny_encoder))


@pytest.fixture(scope="module")
def one_process(tiny_encoder, prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "model"
    return out, train(tiny_cfg(tiny_encoder), out, prepared=prepared, progress=False)


def test_saves_what_export_reads_and_evaluates_while_training(one_process):
    from rlpredict.train.model_meta import ModelMeta

    out, s = one_process
    for f in ("config.json", "model.safetensors", "tokenizer.json", "rlpredict.json", "training_summary.json",
              OWNER_FILE):
        assert (out / f).is_file(), f
    assert ModelMeta.load(out).buckets.n_buckets == 4
    assert s["steps"] == 6 and len(s["loss_per_step"]) == 6
    assert [e["step"] for e in s["eval_history"]] == [2, 4, 6]
    assert {"mae", "kendall_tau", "loss"} <= set(s["eval_best"])
    ckpt = Path(s["trainer"]["checkpoint_dir"])
    assert ckpt == out.parent / "model-checkpoints" and latest_checkpoint(ckpt).name == "checkpoint-6"
    assert not list(out.parent.glob(".model.*"))  # no temporary folder left


def test_two_process_ddp_matches_one_process(tiny_encoder, one_process, tmp_path):
    """`torchrun --nproc_per_node 2 rlpredict train` (gloo on CPU); flags override the config file."""
    _, one = one_process
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data = ["{DATA[0]}"]\nencoder = "{tiny_encoder}"\nmax_rows = 32\nbatch_size = 4\n'
                   "max_length = 32\nhead_lr = 1e-2\nwarmup_ratio = 0.0\neval_rows = 16\neval_steps = 2\nseed = 3\n"
                   'buckets = "quantile:4"\nthreads = 1\nsave_checkpoints = false\nlr = 0.5\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "rlpredict.cli", "train", "-c", str(cfg), "--out", str(tmp_path / "ddp"), "--batch-size", "8",
         "--lr", "1e-3", "--max-steps", "6", "--json"],
        capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    two = json.loads((tmp_path / "ddp" / "training_summary.json").read_text())
    assert two["trainer"]["processes"] == 2 and two["trainer"]["per_device_batch"] == 4
    assert two["config"]["lr"] == 1e-3 and two["config"]["batch_size"] == 8  # flags beat the file
    assert len(two["loss_per_step"]) == len(one["loss_per_step"]) == 6
    diff = max(abs(a - b) for a, b in zip(two["loss_per_step"], one["loss_per_step"], strict=True))
    assert diff <= DDP_TOLERANCE, (diff, two["loss_per_step"], one["loss_per_step"])
    assert two["eval_history"][-1]["mae"] == pytest.approx(one["eval_history"][-1]["mae"], abs=1.0)
    assert not (tmp_path / "ddp-checkpoints").exists()


class _Crash(TrainerCallback):
    """Interrupts training right after the checkpoint of step ``at`` is saved."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_save(self, args, state, control, **kwargs) -> None:
        if state.global_step == self.at:
            raise KeyboardInterrupt


def test_resume_continues_an_interrupted_run(tiny_encoder, prepared, one_process, tmp_path):
    _, full = one_process
    cfg = tiny_cfg(tiny_encoder)
    out = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, prepared=prepared, progress=False, callbacks=[_Crash(4)])
    ckpt = tmp_path / "model-checkpoints"
    assert not out.exists() and latest_checkpoint(ckpt).name == "checkpoint-4"
    # a new run would replace the checkpoints: the message says how to continue (was: only --force)
    with pytest.raises(OutputError, match="holds checkpoints of an earlier run; --resume continues it, --force"):
        train(cfg, out, prepared=prepared, progress=False)
    with pytest.raises(ValueError, match=r"other settings than the interrupted run \(lr\)"):
        train(tiny_cfg(tiny_encoder, lr=5e-4), out, prepared=prepared, progress=False, resume=True)
    s = train(cfg, out, prepared=prepared, progress=False, resume=True)
    assert s["steps"] == 6 and s["steps_this_run"] == 2 and s["trainer"]["resumed_from"].endswith("checkpoint-4")
    # every step's loss, the first four from the checkpoint (was: only the two run after it)
    assert s["loss_per_step"] == pytest.approx(full["loss_per_step"], abs=1e-5)
    assert s["trainer"]["losses_from_step"] == 1 and s["examples_seen"] == full["examples_seen"]
    assert s["loss_first"] == pytest.approx(full["loss_first"], abs=1e-5)
    assert [e["step"] for e in s["eval_history"]] == [2, 4, 6]
    assert s["eval_best"]["mae"] == pytest.approx(full["eval_best"]["mae"], abs=1e-6)


def test_resume_refuses_rows_that_changed_under_the_same_path(tiny_encoder, tmp_path):
    """Was: a log replaced under the same path went on without a word, and the summary named the
    new file beside a best MAE measured on the old one (a reviewer's `train --resume`)."""
    import gzip

    data = tmp_path / "logs.jsonl"
    lines = gzip.decompress(Path(DATA[0]).read_bytes()).decode().splitlines(keepends=True)
    data.write_text("".join(lines[:60]))
    cfg = tiny_cfg(tiny_encoder, data=[str(data)])
    out = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, progress=False, callbacks=[_Crash(2)])
    data.write_text("".join(lines[60:120]))  # other rows, the same path
    with pytest.raises(ValueError, match="--resume on other training rows than the interrupted run's"):
        train(cfg, out, progress=False, resume=True)
    data.write_text("".join(lines[:60]))  # the same rows again: it resumes
    assert train(cfg, out, progress=False, resume=True)["trainer"]["resumed_from"].endswith("checkpoint-2")


class _Stop(TrainerCallback):
    """Ctrl-C at the first step, before any checkpoint."""

    def on_step_end(self, args, state, control, **kwargs) -> None:
        raise KeyboardInterrupt


def test_an_interrupted_forced_rerun_keeps_the_earlier_checkpoints(tiny_encoder, prepared, one_process, tmp_path):
    """``--force`` replaces the earlier run's checkpoints only once the new run has one (was:
    deleted as it started, so a rerun stopped before its first checkpoint lost them: a
    reviewer's SIGTERM 12 s into `train --force`)."""
    _, full = one_process
    ckpt = tmp_path / "model-checkpoints"
    shutil.copytree(Path(full["trainer"]["checkpoint_dir"]), ckpt)
    before = sorted(p.relative_to(ckpt) for p in ckpt.rglob("*"))
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(tiny_encoder), tmp_path / "model", prepared=prepared, progress=False, force=True,
              callbacks=[_Stop()])
    assert sorted(p.relative_to(ckpt) for p in ckpt.rglob("*")) == before
    assert latest_checkpoint(ckpt).name == "checkpoint-6" and not list(tmp_path.glob(".model-checkpoints.*"))
    with pytest.raises(KeyboardInterrupt):  # stopped after its own first checkpoint: that one is kept
        train(tiny_cfg(tiny_encoder), tmp_path / "model", prepared=prepared, progress=False, force=True,
              callbacks=[_Crash(2)])
    assert latest_checkpoint(ckpt).name == "checkpoint-2" and not list(tmp_path.glob(".model-checkpoints.*"))


def test_an_early_stop_ends_with_the_best_model_with_or_without_checkpoints_and_resumed(tiny_encoder, prepared,
                                                                                        tmp_path):
    """Evaluated every step, MAE 147.4, 159.9, 148.3: patience 2 stops at step 3 and keeps step
    1. Without checkpoints the last model was kept and reported as the best; a run resumed
    from step 2 forgot its patience and ran on to step 10."""
    from safetensors.torch import load_file

    cfg = tiny_cfg(tiny_encoder, max_steps=10, eval_steps=1, lr=3e-3, head_lr=0.05, early_stopping_patience=2)
    runs = {}
    for keep in (True, False):
        c = TrainConfig(**{**cfg.to_dict(), "save_checkpoints": keep})
        runs[keep] = train(c, tmp_path / f"m{keep}", prepared=prepared, progress=False)
    for s in runs.values():
        assert s["steps"] == 3 and s["eval_best"]["step"] == 1
        assert s["eval_best"]["mae"] == min(e["mae"] for e in s["eval_history"])
    weights = [load_file(tmp_path / f"m{keep}" / "model.safetensors") for keep in (True, False)]
    assert weights[0].keys() == weights[1].keys() and all(weights[0][k].equal(weights[1][k]) for k in weights[0])
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, prepared=prepared, progress=False, callbacks=[_Crash(2)])
    s = train(cfg, out, prepared=prepared, progress=False, resume=True)
    assert s["steps"] == 3 and s["eval_best"]["step"] == 1 and s["trainer"]["stopped_early"]
    resumed = load_file(out / "model.safetensors")
    assert all(resumed[k].equal(weights[0][k]) for k in weights[0])
    # a resume may change the patience: the count is the checkpoint's, the patience the config's
    out = tmp_path / "more-patient"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, prepared=prepared, progress=False, callbacks=[_Crash(2)])
    s = train(TrainConfig(**{**cfg.to_dict(), "early_stopping_patience": 6}), out, prepared=prepared,
              progress=False, resume=True)
    assert s["steps"] > 3


def test_a_run_stopped_before_its_first_checkpoint_leaves_no_folder(tiny_encoder, prepared, tmp_path):
    """Nothing to resume from: no checkpoint folder is left to block the same command (was: one
    holding only run_config.json, so the rerun needed --force and --resume found nothing)."""
    out = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(tiny_encoder), out, prepared=prepared, progress=False, callbacks=[_Stop()])
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_folder_follows_the_output_rules(tiny_encoder, tmp_path):
    cfg = tiny_cfg(tiny_encoder)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="no tool of ours wrote"):
        train(cfg, tmp_path / "m", checkpoint_dir=tmp_path / "mine", force=True)
    with pytest.raises(OutputError, match="nested"):
        train(cfg, tmp_path / "m", checkpoint_dir=tmp_path / "m" / "ck")
    with pytest.raises(OutputError, match="no complete checkpoint"):
        train(cfg, tmp_path / "m", checkpoint_dir=tmp_path / "none", resume=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    # the encoder folder is an input (was: replaced by --out, or deleted with the checkpoints)
    with pytest.raises(OutputError, match="--out is also an input"):
        train(cfg, tiny_encoder, force=True)
    with pytest.raises(OutputError, match="--checkpoint-dir holds the input"):
        train(cfg, tmp_path / "m", checkpoint_dir=Path(tiny_encoder).parent, force=True)
    # a checkpoint folder for a run that saves none (was: ignored); bf16 without a GPU (was:
    # refused by transformers after the data was read)
    with pytest.raises(OutputError, match="this config saves no checkpoints"):
        train(tiny_cfg(tiny_encoder, save_checkpoints=False), tmp_path / "m", checkpoint_dir=tmp_path / "ck")
    from rlpredict.train.trainer import _accelerator

    if not _accelerator():
        with pytest.raises(ValueError, match="precision = 'bf16' needs a GPU"):
            train(tiny_cfg(tiny_encoder, precision="bf16"), tmp_path / "m")


@pytest.mark.parametrize(("args", "option"), [
    (["--epochs", "0"], "--epochs"), (["--lr", "nan"], "--lr"), (["--lr", "2"], "--lr"),
    (["--batch-size", "0"], "--batch-size"), (["--method", "qlora"], "--method"), (["--loss", "mse"], "--loss"),
    (["--input-mode", "all"], "--input-mode"), (["--encoder", "no/such/dir"], "--encoder"),
    (["--rl-tokenizer", "gpt9"], "--rl-tokenizer")])
def test_train_flags_are_checked_at_parse_time(args, option, tmp_path):
    res = CliRunner().invoke(app, ["train", "--data", DATA[0], "--out", str(tmp_path / "m"), *args])
    assert res.exit_code == 2 and option in res.output, res.output
    assert not (tmp_path / "m").exists()


def test_sampler_orders_global_batches_short_one_last():
    s = LengthGroupedSampler(list(range(21)), 4, seed=0)  # lengths = indices
    order = list(s)
    assert sorted(order) == list(range(21)) and order[-1] == 20  # the short batch (1 item) last
    batches = [order[i:i + 4] for i in range(0, 20, 4)]
    assert all(b == sorted(b) and b[-1] - b[0] == 3 for b in batches)  # each batch: neighbours in length
    s.set_epoch(1)
    assert list(s) != order and sorted(s) == list(range(21))


def test_the_subsample_says_how_much_of_the_training_side_it_kept():
    """``train`` said "train 80 / held out 30" with 130 training-side samples left out by
    max_rows_per_source, and the summary did not count them either."""
    from rlpredict.samples import SAMPLE_FILES
    from rlpredict.train.config import TrainConfig
    from rlpredict.train.trainer import prepare

    full = prepare(TrainConfig(data=[str(p) for p in SAMPLE_FILES.values()], test_frac=0.25))
    cut = prepare(TrainConfig(data=[str(p) for p in SAMPLE_FILES.values()], test_frac=0.25, max_rows_per_source=40))
    assert full.training_side == len(full.train) == cut.training_side > len(cut.train) == 80
    assert len(cut.test) == len(full.test)


def test_resume_takes_the_same_data_files_typed_otherwise(tmp_path, monkeypatch):
    """The data files were compared as typed: `--data a.jsonl` then `--data /abs/a.jsonl` for the
    same file was refused as other data. A run records them resolved, so a resume from another
    folder finds the same file, and another file of the same name is other data."""
    from rlpredict.train.config import TrainConfig
    from rlpredict.train.trainer import RUN_CONFIG, _check_same_run, _data_files

    first, other = tmp_path / "r1", tmp_path / "r2"
    for d in (first, other):
        d.mkdir()
        (d / "a.jsonl").write_text("{}\n")
    monkeypatch.chdir(first)
    cfg = TrainConfig(data=["a.jsonl"])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / RUN_CONFIG).write_text(json.dumps({"config": cfg.to_dict(), "data_files": _data_files(cfg)}))
    _check_same_run(TrainConfig(data=[str(first / "a.jsonl")]), ckpt)
    _check_same_run(TrainConfig(data=["./a.jsonl"], epochs=3), ckpt)  # epochs may change
    monkeypatch.chdir(other)
    _check_same_run(TrainConfig(data=[str(first / "a.jsonl")]), ckpt)
    with pytest.raises(ValueError, match=r"other settings than the interrupted run \(data\)"):
        _check_same_run(TrainConfig(data=["a.jsonl"]), ckpt)  # r2's a.jsonl: another file
    with pytest.raises(ValueError, match=r"--resume with other settings than the interrupted run \(best_metric\)"):
        _check_same_run(TrainConfig(data=[str(first / "a.jsonl")], best_metric="loss"), ckpt)
    # a checkpoint from before data_files: resolved from the folder the resume runs in
    (ckpt / RUN_CONFIG).write_text(json.dumps({"config": TrainConfig(data=["a.jsonl"]).to_dict()}))
    _check_same_run(TrainConfig(data=[str(other / "a.jsonl")]), ckpt)


def test_the_saved_line_names_the_weights_it_saved_and_the_checkpoints(one_process):
    from rlpredict.cli import saved_line

    out, s = one_process
    line = saved_line(s, out)
    best = s["eval_best"]["step"]
    assert line.startswith(f"{out}  (6 steps, loss ")
    assert (f"step {best}'s weights, the best by held-out mae" if best != 6 else "held-out mae best here") in line
    assert f"checkpoints kept in {s['trainer']['checkpoint_dir']}" in line and "stopped early" not in line
    early = {**s, "steps": 4, "trainer": {**s["trainer"], "stopped_early": True, "checkpoint_dir": None}}
    assert "(4 steps of 6: stopped early" in saved_line(early, out) and "checkpoints" not in saved_line(early, out)


def test_an_encoder_whose_weights_do_not_load_is_refused(tiny_encoder, prepared, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "renamed"
    shutil.copytree(tiny_encoder, bad)
    weights = load_file(bad / "model.safetensors")
    save_file({f"renamed.{k}": v for k, v in weights.items()}, bad / "model.safetensors")
    with pytest.raises(ValueError, match="of the encoder's weights are not in its checkpoint"):
        train(tiny_cfg(bad), tmp_path / "out", prepared=prepared, progress=False)
    assert not (tmp_path / "out").exists()


def test_training_log_lines_go_to_stderr_readable(capsys):
    from types import SimpleNamespace

    from tqdm.auto import tqdm

    from rlpredict.train.trainer import _StderrProgress

    cb = _StderrProgress()
    cb.training_bar = tqdm(total=2, disable=True)
    state = SimpleNamespace(is_world_process_zero=True, global_step=2)
    cb.on_log(None, state, None, logs={"loss": 2.3456, "learning_rate": 4.1e-5, "grad_norm": 1.0, "epoch": 0.5})
    cb.on_log(None, state, None, logs={"eval_mae": 118.14, "eval_kendall_tau": 0.21, "eval_runtime": 1.0,
                                       "eval_loss": 2.0})
    cb.on_log(None, state, None, logs={"train_runtime": 3.0, "train_samples_per_second": 9.7})
    out = capsys.readouterr()
    assert out.out == ""  # was: {'loss': ...} dicts on stdout, inside a redirected report
    assert out.err.splitlines() == ["step 2: loss 2.346, lr 4.1e-05, grad_norm 1",
                                    "step 2: held-out mae 118.1, kendall_tau 0.21, loss 2"]


def test_an_interrupted_train_names_the_checkpoint_it_kept(tiny_encoder, tmp_path, monkeypatch):
    import rlpredict.train.trainer as trainer_mod

    out = tmp_path / "m"

    def interrupted(cfg, out_dir, **kw):
        ckpt = out_dir.parent / f"{out_dir.name}-checkpoints" / "checkpoint-2"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_mod, "train", interrupted)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'encoder = "{tiny_encoder}"\nmax_length = 32\nmax_rows = 32\nmax_steps = 4\n')
    r = CliRunner().invoke(app, ["train", "--data", DATA[0], "-c", str(cfg), "--out", str(out)])
    assert r.exit_code == 130, r.output
    flat = " ".join(r.output.split())
    assert "checkpoint-2 kept: the same command with --resume continues from it" in flat
    assert "interrupted: no output was written" in flat and not out.exists()


def test_an_encoder_whose_config_disagrees_with_its_weights_is_refused(tiny_encoder, prepared, tmp_path):
    import shutil

    bad = tmp_path / "longer"
    shutil.copytree(tiny_encoder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["max_position_embeddings"] = 128  # the weights hold 64 positions
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"do not match its config\.json .*position_embeddings.*\[64, 32\] in the "
                                         r"checkpoint, \[128, 32\] by config\.json"):
        train(tiny_cfg(bad), tmp_path / "out", prepared=prepared, progress=False)


def test_resuming_a_finished_run_writes_its_model_or_is_refused(tiny_encoder, prepared, one_process, tmp_path):
    import shutil

    out, first = one_process
    with pytest.raises(OutputError, match=r"already ended \(its 6 steps, or an early stop\) and its model is in"):
        train(tiny_cfg(tiny_encoder), out, prepared=prepared, progress=False, resume=True, force=True)
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 6
    # killed after its last checkpoint, before the model folder was written: --resume writes it
    # from the checkpoints, training nothing (was: refused, or a step past the plan)
    run = tmp_path / "run"
    shutil.copytree(Path(first["trainer"]["checkpoint_dir"]), tmp_path / "run-checkpoints")
    again = train(tiny_cfg(tiny_encoder), run, prepared=prepared, progress=False, resume=True)
    assert again["steps"] == 6 and again["steps_this_run"] == 0 and again["eval_best"] == first["eval_best"]
    assert (run / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    # its best checkpoint is looked for in this folder (the state names where it was): gone, refused
    shutil.rmtree(run)
    state = tmp_path / "run-checkpoints" / "checkpoint-6" / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "best_global_step": 2}))  # deleted by the limit
    with pytest.raises(OutputError, match="checkpoint-2: this run's best checkpoint is missing"):
        train(tiny_cfg(tiny_encoder), run, prepared=prepared, progress=False, resume=True)
    assert not run.exists()  # (was: the last checkpoint's weights written as the model, without a word)


def test_a_checkpoint_where_early_stopping_ended_the_run_counts_as_its_end(tmp_path):
    from rlpredict.train.trainer import _checkpoint_done

    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    state = {"global_step": 3, "stateful_callbacks": {"TrainerControl": {"args": {"should_training_stop": True}}}}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    assert _checkpoint_done(ckpt, 40)  # (was: resumed, it trained on to step 7)
    state["stateful_callbacks"]["TrainerControl"]["args"]["should_training_stop"] = False
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    assert not _checkpoint_done(ckpt, 40) and _checkpoint_done(ckpt, 3)
    (ckpt / "trainer_state.json").write_text("{not json")
    assert not _checkpoint_done(ckpt, 3)


@pytest.mark.parametrize("side", ["right", "left"])
def test_training_ids_are_the_whole_texts_cut_and_long_texts_are_cut_before_tokenizing(side):
    """``token_ids`` (train and eval) gives the ids of tokenizing each text whole and cutting it,
    as transformers' call does, with a transformers tokenizer with or without a ``tokenizers``
    backend; the fast one never tokenizes a long text whole."""
    import transformers

    from rlpredict.inputs import InputSpec
    from rlpredict.serve import runtime
    from rlpredict.train.encoders import encoder_path, token_ids

    spec = InputSpec(mode="history" if side == "left" else "last_user", max_length=24)
    assert spec.truncation_side == side
    long = "Explain, step by step, how a compiler works. " * 5_000
    texts = ["", "hi", "word " * 2_000 + "end", long, "x" * 5_000, "你好" * 3_000, "[SEP] a [MASK] b"]
    src = encoder_path()
    fast = transformers.AutoTokenizer.from_pretrained(src)
    slow = transformers.BertTokenizer.from_pretrained(src)
    fast.truncation_side = slow.truncation_side = side
    want = fast(texts, truncation=True, max_length=spec.max_length)["input_ids"]
    assert slow(texts, truncation=True, max_length=spec.max_length)["input_ids"] == want
    seen: list[int] = []
    real = runtime.TextEncoder.encode_batch

    def recording(self, chunk):
        seen.extend(len(t) for t in chunk)
        return real(self, chunk)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runtime.TextEncoder, "encode_batch", recording)
        mp.setattr(runtime, "ENCODE_CHUNK", 3)
        assert list(token_ids(fast, iter(texts), spec)) == want
    assert seen == [len(t) for t in texts]  # every text through the cutting encoder, as it came
    assert list(token_ids(slow, iter(texts), spec)) == want


def test_a_response_over_the_most_a_scheme_names_is_kept_and_said(tiny_encoder, tmp_path):
    data = tmp_path / "logs.jsonl"
    rows = [{"prompt": f"question {i}", "rl_tokens": 10 + 40 * i} for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in [*rows, {"prompt": "go on", "rl_tokens": 3_000_000}]))
    prep = prepare(tiny_cfg(tiny_encoder, data=[str(data)], test_frac=0.01, buckets="default", max_rows=100))
    assert prep.scheme.reserve_tokens[-1] <= 1 << 20 and len(prep.train) + len(prep.test) == 41
    assert (f"1 training response over 1048576 tokens count as 1048576 in the buckets' reservations and "
            f"quantiles (first: {data}:41)") in prep.report.summary()
