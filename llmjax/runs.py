"""Runs on disk: the parameters, config and tokenizer of a training workdir, a fine-tuning workdir or an export
directory, loaded for fine-tuning, decoding and merging LoRA adapters.

A fine-tuning workdir is recognised by FINETUNE_INFO (task, labels, where the base came from); an export by
config.json + params/ (llmjax.checkpoint); a training workdir by checkpoints/.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_collections
import numpy as np
import orbax.checkpoint as ckpt_io
from flax import nnx

from llmjax import checkpoint as ckpt
from llmjax import storage
from llmjax.data import prepare as prep
from llmjax.data.prepare import data_dir_of
from llmjax.data.shards import MANIFEST, TOKENIZER_FILE
from llmjax.data.tokenizer import Tokenizer, TokenizerError
from llmjax.models.config import ModelConfig
from llmjax.models.layers import Linear
from llmjax.params import build_with_params, flat_values, flatten, path_str

FINETUNE_INFO = "finetune.json"


class RunError(Exception):
    """A directory that is not a loadable run; the message names it and what is missing."""


def read_params_checkpoint(directory: Path) -> dict[str, np.ndarray]:
    """{path: array} of the `params` of an Orbax state checkpoint, read without a target (any structure)."""
    with ckpt_io.StandardCheckpointer() as r:
        tree = r.restore(storage.path(directory))  # absolute (Orbax needs it), or a URL
    tree = tree.get("params", tree)
    flat = flatten(tree)
    return {k.removesuffix("/value"): np.asarray(v) for k, v in flat.items()}


def _newest_state_dir(workdir: Path) -> tuple[Path, int]:
    steps = ckpt.Checkpoints(workdir).steps()
    if not steps:
        raise FileNotFoundError(f"{workdir / 'checkpoints'} holds no checkpoint")
    return workdir / "checkpoints" / str(steps[0]) / "state", steps[0]


def load_pretrained(source) -> tuple[dict[str, np.ndarray], dict, Path | None, str]:
    """({path: array} parameters, run config, tokenizer file or None, description) of a pretrained
    source: an export directory (config.json + params/), a fine-tuning workdir, or a training workdir."""
    src = storage.path(source)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    if (src / ckpt.EXPORT_CONFIG).is_file() and (src / ckpt.EXPORT_PARAMS).is_dir():
        cfg = json.loads((src / ckpt.EXPORT_CONFIG).read_text())
        params = read_params_checkpoint(src / ckpt.EXPORT_PARAMS)
        return params, cfg, find_tokenizer(src, cfg), f"export {src}"
    if (src / FINETUNE_INFO).is_file():
        model, cfg = load_finetuned(src)
        params = {k: np.asarray(v) for k, v in flat_values(nnx.state(model, nnx.Param)).items()}
        if cfg["model"].get("lora_rank"):  # continue from the merged weights
            merged = merge_lora_model(model)
            params = {k: np.asarray(v) for k, v in flat_values(nnx.state(merged, nnx.Param)).items()}
            cfg = {**cfg, "model": model_dict(merged.cfg)}
        return params, cfg, find_tokenizer(src, cfg), f"fine-tuned run {src}"
    if (src / "checkpoints").is_dir():
        state, step, cfg = ckpt.load_latest(src)
        params = {k: np.asarray(v) for k, v in flat_values(state.params).items()}
        return params, cfg, find_tokenizer(src, cfg), f"checkpoint {src}/checkpoints/{step}"
    raise FileNotFoundError(f"{src} is neither a training workdir (no checkpoints/) nor an export directory "
                            "(config.json + params/)")


def find_tokenizer(directory, cfg: dict) -> Path | None:
    """The tokenizer of a run: DIR/tokenizer.model (exports and fine-tuning runs), data.tokenizer_model, or the
    prepared data of a training workdir (the manifest whose fingerprint matches the run's data config)."""
    directory = storage.path(directory)
    if (directory / TOKENIZER_FILE).is_file():
        return directory / TOKENIZER_FILE
    data = cfg.get("data") or {}
    if data.get("tokenizer_model") and storage.path(data["tokenizer_model"]).is_file():
        return storage.path(data["tokenizer_model"])
    try:
        base = data_dir_of(ml_collections.ConfigDict(data), directory)
        found = sorted((d for d in base.iterdir() if (d / MANIFEST).is_file() and (d / TOKENIZER_FILE).is_file()),
                       key=lambda d: storage.path(d / MANIFEST).stat().mtime, reverse=True) if base.is_dir() else []
        want = _data_fingerprint(data)
        for d in found:
            if want and json.loads((d / MANIFEST).read_text()).get("fingerprint") == want:
                return d / TOKENIZER_FILE
        return found[0] / TOKENIZER_FILE if found else None  # the newest prepared data of this run
    except Exception:
        return None


def _data_fingerprint(data: dict) -> str | None:
    """The prepared-data fingerprint of a data config (as llmjax.data.prepare computes it), if cheap."""
    try:
        cfg = ml_collections.ConfigDict(data)
        files = prep._source_files(cfg) if prep._sources_list(cfg.sources) else None
        tok = prep._load_tokenizer(cfg) if cfg.tokenizer_model else None
        return prep._fingerprint(prep._inputs(cfg, files, tok))
    except Exception:
        return None


def model_dict(model_cfg: ModelConfig) -> dict:
    """The model section of a run config (config.json) for `model_cfg`."""
    d = dataclasses.asdict(model_cfg)
    d["lora_targets"] = list(d["lora_targets"])
    return d


def load_finetuned(workdir, base=None):
    """(model, config) of a fine-tuning workdir: the model of its config.json with the base parameters
    (`base`, default the run's --init-from) and the newest checkpoint's parameters (all of them, or the LoRA
    adapters and task head) on top."""
    workdir = storage.path(workdir)
    cfg = json.loads((workdir / "config.json").read_text())
    info = json.loads((workdir / FINETUNE_INFO).read_text())
    model_cfg = ModelConfig.from_dict(cfg["model"])
    state_dir, step = _newest_state_dir(workdir)
    values = read_params_checkpoint(state_dir)
    if info.get("saved") == "trainable":  # LoRA run: the base weights come from the pretrained source
        base_params, _, _, _ = load_pretrained(base or info["init_from"])
        values = {**base_params, **values}
    model = build_with_params(model_cfg, values, int(cfg["train"]["seed"]))
    return model, {**cfg, "finetuned_step": step}


def merge_lora_model(model):
    """A model without adapters whose every adapted kernel is W + (alpha / r) A B; other parameters copied."""
    merged_cfg = model.cfg.replace(lora_rank=0)
    values = {k: v for k, v in flat_values(nnx.state(model, nnx.Param)).items() if not k.endswith(("lora_a", "lora_b"))}
    for path, module in model.iter_modules():
        if isinstance(module, Linear) and module.lora_rank:
            values[path_str(path) + "/kernel"] = module.merged_kernel()
    merged = build_with_params(merged_cfg, values)
    missing = sorted(set(flat_values(nnx.state(merged, nnx.Param))) - set(values))
    if missing:
        raise ValueError(f"merge-lora: no values for {', '.join(missing[:5])}")
    return merged


def load_for_inference(directory, tokenizer_path=None):
    """(model, run config, tokenizer, description) of a training workdir (newest good checkpoint), a
    fine-tuning workdir (llmjax finetune) or an export directory (llmjax export / merge-lora). Errors are
    RunError messages naming the flag or file."""

    def fail(msg):
        raise RunError(msg)

    d = storage.path(directory)
    if not d.is_dir():
        fail(f"--workdir {d} does not exist (or is not a directory)")
    try:
        if (d / ckpt.EXPORT_CONFIG).is_file() and (d / ckpt.EXPORT_PARAMS).is_dir():
            cfg = json.loads((d / ckpt.EXPORT_CONFIG).read_text())
            model = build_with_params(ModelConfig.from_dict(cfg["model"]),
                                      read_params_checkpoint(d / ckpt.EXPORT_PARAMS))
            what = f"export {d}"
        elif (d / FINETUNE_INFO).is_file():
            model, cfg = load_finetuned(d)
            what = f"fine-tuned {d}, step {cfg['finetuned_step']}"
        elif (d / ckpt.CHECKPOINTS).is_dir():
            state, step, cfg = ckpt.load_latest(d)
            model = build_with_params(ModelConfig.from_dict(cfg["model"]), flat_values(state.params))
            what = f"{d}, step {step}"
        else:
            fail(f"--workdir {d} has no checkpoints/ (train with `llmjax train --workdir {d}`) and is not an export "
                 "directory (config.json + params/)")
    except FileNotFoundError as e:
        fail(f"--workdir {d}: {e}")
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        fail(f"--workdir {d}: cannot load the model: {type(e).__name__}: {e}")
    tok = storage.path(tokenizer_path) if tokenizer_path else find_tokenizer(d, cfg)
    if tok is None:
        fail(f"cannot find the tokenizer of {d} (no {d}/tokenizer.model and no prepared data of its config); "
             "pass --tokenizer PATH/tokenizer.model")
    try:
        tokenizer = Tokenizer.load(tok)
    except TokenizerError as e:
        fail(f"--tokenizer: {e}")
    if tokenizer.vocab_size != model.cfg.vocab_size:
        fail(f"the tokenizer {tok} has {tokenizer.vocab_size} pieces but the model's vocabulary is "
             f"{model.cfg.vocab_size}; pass the run's own --tokenizer")
    return model, cfg, tokenizer, what
