"""Run configuration: ml_collections ConfigDicts built by `configs/*.py:get_config()`, loaded and checked here.

The model section is validated by llmjax.models.config.ModelConfig; errors name the field (`model.num_heads`).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import ml_collections

from llmjax import sharding, storage
from llmjax.data.prepare import default_data_config
from llmjax.loop import default_train_config
from llmjax.models.config import ConfigError, ModelConfig, model_config_dict
from llmjax.objectives import OBJECTIVES, objective_config
from llmjax.profiling import parse_profile_steps
from llmjax.state import default_optim_config


def base_config(*, objective: str, **model) -> ml_collections.ConfigDict:
    """A complete run config: the model section from `model` (ModelConfig fields), the objective, and the
    defaults of every other section (data, train, optim, mesh, sharding) for the config file to adjust."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective: unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    cfg = ml_collections.ConfigDict()
    cfg.model = model_config_dict(**model)
    cfg.objective = objective
    cfg.objective_args = ml_collections.ConfigDict({}, type_safe=False)  # fields of the objective's config class
    cfg.data = default_data_config()
    cfg.data.vocab_size = cfg.model.vocab_size
    cfg.train = default_train_config()
    cfg.optim = default_optim_config()
    cfg.mesh = sharding.mesh_config()
    cfg.sharding = sharding.sharding_config()
    return cfg


def load_config(path: str | pathlib.Path, function: str = "get_config", example: str = "configs/gpt_tiny.py",
                flag: str = "--config") -> ml_collections.ConfigDict:
    """Import a config file and call its get_config() (or `function`, e.g. a grid file's get_grid())."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: file {str(path)!r} does not exist; pass e.g. {flag} {example}")
    spec = importlib.util.spec_from_file_location(f"llmjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, function):
        raise ConfigError(f"file {str(path)!r} has no {function}() function")
    return getattr(module, function)()


def model_config(cfg: ml_collections.ConfigDict) -> ModelConfig:
    return ModelConfig.from_dict(cfg.model)


def objective_config_for(cfg) -> dict:
    """The objective's config fields of a run config: its `objective_args` plus the row length from
    train.seq_length."""
    args = cfg.objective_args.to_dict() if cfg.get("objective_args") else {}
    return objective_config(cfg.objective, args, cfg.train.seq_length)


# ------------------------------------------------------------------------------------------- validation
# train fields: (name, lowest allowed value, what the value means / how to fix it)
_TRAIN_AT_LEAST = (
    ("steps", 1, "the number of optimizer steps"),
    ("batch_size", 1, "global rows per step"),
    ("seq_length", 1, "the packed row length"),
    ("micro_batches", 1, "1 = no gradient accumulation"),
    ("log_every", 1, "log every N steps"),
    ("eval_every", 1, "evaluate every N steps; set it above train.steps to evaluate only at the end"),
    ("eval_batches", 1, "batches per evaluation"),
    ("checkpoint_every", 0, "0 = checkpoint only at the end"),
    ("keep_checkpoints", 0, "the newest K checkpoints are kept"),
    ("num_samples", 0, "0 = no sampled continuations"),
    ("sample_length", 0, "tokens per sampled continuation"),
    ("data_workers", 0, "0 = build batches in this process"),
    ("z_loss", 0, "0 = off"),
    ("peak_flops", 0, "0 = known accelerator peak"),
)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_train_config(cfg) -> None:
    """Check every numeric field of the `train` section (and the optim numbers that have a clearly wrong range)
    of a run config before anything is prepared or compiled; raises ConfigError naming the field and the fix,
    e.g. "train.eval_every must be >= 1, got 0". Fields the config does not have are skipped."""
    tc = cfg.get("train") or {}
    for name, low, about in _TRAIN_AT_LEAST:
        if name not in tc:
            continue
        value = tc[name]
        if not _number(value):
            raise ConfigError(f"train.{name} must be a number, got {value!r}")
        if name not in ("z_loss", "peak_flops") and value != int(value):
            raise ConfigError(f"train.{name} must be a whole number, got {value!r}")
        if value < low:
            raise ConfigError(f"train.{name} must be >= {low}, got {value}; set --config.train.{name}={low} or "
                              f"higher ({about})")
    if "label_smoothing" in tc:
        value = tc.label_smoothing
        if not _number(value) or not 0.0 <= value < 1.0:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got {value!r} (0 = off; e.g. 0.1)")
    if "profile_steps" in tc:
        try:
            parse_profile_steps(tc.profile_steps)
        except ValueError as e:  # the message names the field and the fix
            raise ConfigError(str(e)) from None
    oc = cfg.get("optim") or {}
    checks = (
        ("learning_rate", lambda v: v > 0, "must be > 0", "e.g. --config.optim.learning_rate=1e-3"),
        ("warmup_steps", lambda v: v >= 0 and v == int(v), "must be a whole number >= 0", "0 = no warmup"),
        ("min_lr_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]", "the final fraction of the learning rate"),
        ("b1", lambda v: 0 <= v < 1, "must be in [0, 1)", "e.g. 0.9"),
        ("b2", lambda v: 0 <= v < 1, "must be in [0, 1)", "e.g. 0.95"),
        ("eps", lambda v: v >= 0, "must be >= 0", "e.g. 1e-8"),
        ("weight_decay", lambda v: v >= 0, "must be >= 0", "0 = off"),
        ("clip_norm", lambda v: v >= 0, "must be >= 0", "0 = off"),
    )
    for name, ok, rule, hint in checks:
        if name not in oc:
            continue
        value = oc[name]
        if not _number(value) or not ok(value):
            raise ConfigError(f"optim.{name} {rule}, got {value!r} ({hint})")


def check_workdir(path, flag: str = "--workdir") -> None:
    """A user's run directory, before anything is written: it may not exist yet (then its nearest existing
    parent must be a writable directory); if it exists it must be a writable directory. A gs:// URL: its
    bucket must exist and answer with the current credentials."""
    if storage.is_remote(path):
        storage.check_reachable(path, flag)
        return
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag}: {str(path)!r} exists and is not a directory; pass a directory path")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError(f"{flag}: {str(path)!r} cannot be created: {str(existing)!r} is a file, not a directory")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {str(existing)!r} is not writable"
        raise ConfigError(f"{flag}: {str(path)!r} {what}; pass a directory you can write to")
