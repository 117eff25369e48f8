"""Run configuration: ml_collections ConfigDicts built by `configs/*.py:get_config()`, loaded and checked here.

The model section is validated by llmjax.models.config.ModelConfig; errors name the field (`model.num_heads`).
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

from llmjax.models.config import ConfigError, ModelConfig, model_config_dict

OBJECTIVES = ("causal_lm", "prefix_lm", "mlm", "span_corruption")


def base_config(*, objective: str, **model) -> ml_collections.ConfigDict:
    """A complete run config: the model section from `model` (ModelConfig fields), the objective, and the
    defaults of every other section (data, train, optim, mesh, sharding) for the config file to adjust."""
    from llmjax import sharding, train
    from llmjax.data.prepare import default_data_config

    if objective not in OBJECTIVES:
        raise ConfigError(f"objective: unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    cfg = ml_collections.ConfigDict()
    cfg.model = model_config_dict(**model)
    cfg.objective = objective
    cfg.objective_args = ml_collections.ConfigDict({}, type_safe=False)  # fields of the objective's config class
    cfg.data = default_data_config()
    cfg.data.vocab_size = cfg.model.vocab_size
    cfg.train = train.default_train_config()
    cfg.optim = train.default_optim_config()
    cfg.mesh = sharding.mesh_config()
    cfg.sharding = ml_collections.ConfigDict({"rules": [list(r) for r in sharding.DEFAULT_RULES]})
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
