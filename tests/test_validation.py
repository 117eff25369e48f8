"""check_train_config: every number of the train section (and the optim numbers with a clearly wrong range) is
checked before data preparation, with one ConfigError naming the field and the fix (issue 20, item 6)."""

import pathlib

import pytest

from llmjax import finetune, train
from llmjax.config import check_train_config, check_workdir, load_config, model_config
from llmjax.models.config import ConfigError

ROOT = pathlib.Path(__file__).parent.parent
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.py") if "compare" not in p.parts)


def gpt_tiny():
    return load_config(ROOT / "configs" / "gpt_tiny.py")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_shipped_configs_pass(path):
    check_train_config(load_config(path))


@pytest.mark.parametrize("section,field,value,expected", [
    ("train", "eval_every", 0, "train.eval_every must be >= 1, got 0"),
    ("train", "log_every", 0, "train.log_every must be >= 1, got 0"),
    ("train", "steps", 0, "train.steps must be >= 1, got 0"),
    ("train", "batch_size", 0, "train.batch_size must be >= 1, got 0"),
    ("train", "seq_length", 0, "train.seq_length must be >= 1, got 0"),
    ("train", "micro_batches", 0, "train.micro_batches must be >= 1, got 0"),
    ("train", "eval_batches", 0, "train.eval_batches must be >= 1, got 0"),
    ("train", "checkpoint_every", -1, "train.checkpoint_every must be >= 0, got -1"),
    ("train", "keep_checkpoints", -1, "train.keep_checkpoints must be >= 0, got -1"),
    ("train", "num_samples", -1, "train.num_samples must be >= 0, got -1"),
    ("train", "data_workers", -2, "train.data_workers must be >= 0, got -2"),
    ("train", "z_loss", -1e-4, "train.z_loss must be >= 0, got -0.0001"),
    ("train", "label_smoothing", 1.0, "train.label_smoothing must be in [0, 1), got 1.0"),
    ("train", "label_smoothing", -0.1, "train.label_smoothing must be in [0, 1), got -0.1"),
    ("optim", "learning_rate", 0.0, "optim.learning_rate must be > 0"),
    ("optim", "learning_rate", -1e-3, "optim.learning_rate must be > 0"),
    ("optim", "warmup_steps", -1, "optim.warmup_steps must be a whole number >= 0"),
    ("optim", "b2", 1.0, "optim.b2 must be in [0, 1)"),
    ("optim", "weight_decay", -0.1, "optim.weight_decay must be >= 0"),
    ("optim", "clip_norm", -1.0, "optim.clip_norm must be >= 0"),
])
def test_bad_number_is_named_with_the_fix(section, field, value, expected):
    cfg = gpt_tiny()
    cfg[section][field] = value
    with pytest.raises(ConfigError) as e:
        check_train_config(cfg)
    assert expected in str(e.value)
    if "must be >=" in expected and section == "train":
        assert f"--config.train.{field}=" in str(e.value)


def test_zero_means_off_is_allowed():
    cfg = gpt_tiny()
    cfg.train.update(checkpoint_every=0, keep_checkpoints=0, num_samples=0, data_workers=0, z_loss=0.0,
                     label_smoothing=0.0)
    cfg.optim.update(warmup_steps=0, weight_decay=0.0, clip_norm=0.0)
    check_train_config(cfg)


def test_train_refuses_a_layout_before_preparing_or_writing_anything(tmp_path):
    """The batch against micro-batches and the mesh (llmjax.sharding.validate_layout) before the lock and the
    data preparation: nothing appears in the workdir."""
    cfg = gpt_tiny()
    cfg.train.update(batch_size=6, micro_batches=4)
    with pytest.raises(ConfigError, match="train.batch_size=6 is not divisible by train.micro_batches=4"):
        train.train_and_evaluate(cfg, tmp_path / "run", progress=False)
    cfg = gpt_tiny()
    cfg.mesh.update(data=3)  # the test session has 8 devices
    with pytest.raises(ConfigError, match="mesh"):
        train.train_and_evaluate(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_train_refuses_before_preparing_or_writing_anything(tmp_path):
    """Today eval_every=0 crashed with ZeroDivisionError after data preparation, compilation and one step."""
    for field, value in [("eval_every", 0), ("log_every", 0), ("checkpoint_every", -1), ("batch_size", 0)]:
        cfg = gpt_tiny()
        cfg.train[field] = value
        workdir = tmp_path / field
        with pytest.raises(ConfigError, match=f"train.{field} must be >= "):
            train.train_and_evaluate(cfg, workdir, progress=False)
        assert not workdir.exists()


def test_check_run_config_checks_the_train_section():
    cfg = gpt_tiny()
    cfg.train.eval_every = 0
    with pytest.raises(ConfigError, match="train.eval_every must be >= 1, got 0"):
        train.check_run_config(cfg, model_config(cfg))


def test_finetune_checks_the_train_section(tmp_path):
    cfg = load_config(ROOT / "configs" / "finetune" / "doc_vs_code.py")
    for field in ("train_file", "validation_file"):
        (tmp_path / f"{field}.jsonl").write_text('{"text": "a", "label": "x"}\n')
        cfg[field] = str(tmp_path / f"{field}.jsonl")
    finetune._check_config(cfg)
    cfg.train.log_every = 0
    with pytest.raises(ConfigError, match="train.log_every must be >= 1, got 0"):
        finetune._check_config(cfg)


def test_check_workdir(tmp_path):
    check_workdir(tmp_path)  # an existing directory
    check_workdir(tmp_path / "new" / "run")  # created later
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="--workdir: .* exists and is not a directory"):
        check_workdir(tmp_path / "f")
    with pytest.raises(ConfigError, match="--workdir: .* cannot be created: .* is a file"):
        check_workdir(tmp_path / "f" / "run")
    assert not any(p.name == "run" for p in tmp_path.rglob("*"))
