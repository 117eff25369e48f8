"""End to end: each tiny config trains with its classic objective through `llmjax train` and its
validation loss falls clearly; the workdir gets config, metrics, TensorBoard events and loss.png; the first
losses are the golden ones (helpers/golden.py)."""

import json
import pathlib

import pytest

from helpers.cli_process import run_cli
from helpers.golden import check_first_losses
from llmjax.metrics import read_metrics

CONFIGS = pathlib.Path(__file__).parent.parent / "configs"
SMALL = ["--config.data.max_documents=600", "--config.data.vocab_size=1500", "--config.model.vocab_size=1500",
         "--config.train.steps=40", "--config.train.log_every=1", "--config.train.eval_every=20",
         "--config.train.eval_batches=4", "--config.train.batch_size=8", "--config.train.seed=0"]


@pytest.mark.slow
@pytest.mark.parametrize("name,objective", [("gpt_tiny", "causal_lm"), ("bert_tiny", "mlm"),
                                            ("t5_tiny", "span_corruption")])
def test_tiny_config_trains_and_validation_loss_falls(name, objective, tmp_path, small_corpus_dir):
    workdir = tmp_path / name
    extra = [] if name == "gpt_tiny" else ["--config.train.num_samples=0"]
    extra.append(f"--config.data.data_dir={small_corpus_dir}")  # the SMALL corpus, prepared once per session
    out = run_cli(["train", f"--config={CONFIGS / name}.py", f"--workdir={workdir}", *SMALL, *extra])  # 2 devices
    rows = read_metrics(workdir)
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    trains = [r for r in rows if "train/loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0] - 1.0, evals  # falls by more than a nat
    check_first_losses(name, rows)
    assert trains[-1]["step"] == 40 and trains[-1]["train/tokens_per_sec"] > 0 and 0 < trains[-1]["train/mfu"] < 1
    for key in ("train/accuracy", "train/perplexity", "train/learning_rate", "train/grad_norm", "train/step_time"):
        assert key in trains[-1]
    assert json.loads((workdir / "config.json").read_text())["objective"] == objective
    assert (workdir / "loss.png").stat().st_size > 1000
    assert any((workdir / "tensorboard").iterdir())
    assert "validation loss:" in out
    if name == "gpt_tiny":
        assert "samples:" in out
