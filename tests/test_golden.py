"""Golden losses: the first 5 training losses of the tiny configs (fixed seed, one device, the shared small
corpus) equal, bit for bit, those recorded in tests/golden/first_losses.json before the code was reorganized.

A refactor that changes no behaviour keeps them; a deliberate change of numerics re-records them with
`LLMJAX_WRITE_GOLDEN=1 pytest tests/test_golden.py` and says why in its commit."""

import json
import os
import pathlib

import pytest

from helpers.cli_process import run_cli
from llmjax.metrics import read_metrics

ROOT = pathlib.Path(__file__).parent.parent
GOLDEN = pathlib.Path(__file__).parent / "golden" / "first_losses.json"
CONFIGS = ("gpt_tiny", "bert_tiny", "t5_tiny", "moe_tiny")
STEPS = 5
ARGS = ["--config.data.max_documents=600", "--config.data.vocab_size=1500", "--config.model.vocab_size=1500",
        f"--config.train.steps={STEPS}", "--config.train.log_every=1", "--config.train.eval_every=1000",
        "--config.train.eval_batches=1", "--config.train.num_samples=0", "--config.train.checkpoint_every=0",
        "--config.train.batch_size=8", "--config.train.seed=0"]


def first_losses(name: str, workdir: pathlib.Path, data_dir: str) -> list[float]:
    run_cli(["train", f"--config={ROOT / 'configs' / name}.py", f"--workdir={workdir}", *ARGS,
             f"--config.data.data_dir={data_dir}"], devices=1)
    return [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]


@pytest.mark.parametrize("name", CONFIGS)
def test_first_training_losses_are_unchanged(name, tmp_path, small_corpus_dir):
    losses = first_losses(name, tmp_path / name, small_corpus_dir)
    assert len(losses) == STEPS
    if os.environ.get("LLMJAX_WRITE_GOLDEN") == "1":
        recorded = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        recorded[name] = losses
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(dict(sorted(recorded.items())), indent=2) + "\n")
    expected = json.loads(GOLDEN.read_text())[name]
    assert losses == expected, f"{name}: {losses} != recorded {expected}"
