"""Run configuration: ml_collections ConfigDicts built by `configs/*.py:get_config()`, loaded and checked here.

The model section is validated by llmjax.models.config.ModelConfig; errors name the field (`model.num_heads`).
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

from llmjax import sharding
from llmjax.data.prepare import default_data_config
from llmjax.loop import default_train_config
from llmjax.models.config import ConfigError, ModelConfig, model_config_dict
from llmjax.objectives import OBJECTIVES, objective_config
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
