"""Pretraining objectives: numpy transforms from token-id documents to unpacked examples (one module each),
the model families each objective can train, and the helpers the objective modules share."""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from llmjax.models.config import FAMILIES  # the config module only: the data pipeline stays free of model code

# objective name -> model families it can train. The single source of truth: the objective classes read it.
OBJECTIVE_FAMILIES: dict[str, tuple[str, ...]] = {
    "causal_lm": ("decoder",),
    "prefix_lm": ("decoder", "encoder_decoder"),
    "mlm": ("encoder",),
    "span_corruption": ("encoder_decoder", "decoder"),
    # mixtures of denoisers (mixture.py): UL2's and UL2R's, or the denoisers listed in objective_args
    "ul2": ("encoder_decoder", "decoder"),
    "ul2r": ("decoder", "encoder_decoder"),
    "mixture": ("encoder_decoder", "decoder"),
}

# objective name -> (module, objective class, config class, the config field that train.seq_length fills);
# imported lazily so that the objective modules can import the helpers below without a cycle.
_CLASSES = {
    "causal_lm": ("causal_lm", "CausalLM", "CausalLMConfig", "max_length"),
    "prefix_lm": ("prefix_lm", "PrefixLM", "PrefixLMConfig", "max_length"),
    "mlm": ("mlm", "MLM", "MLMConfig", "max_length"),
    "span_corruption": ("span_corruption", "SpanCorruption", "SpanCorruptionConfig", "inputs_length"),
    "ul2": ("mixture", "UL2", "UL2Config", "max_length"),
    "ul2r": ("mixture", "UL2R", "UL2RConfig", "max_length"),
    "mixture": ("mixture", "Mixture", "MixtureConfig", "max_length"),
}
OBJECTIVES = tuple(OBJECTIVE_FAMILIES)
MIXTURES = ("ul2", "ul2r", "mixture")  # the mixtures of denoisers (mixture.py)
# objectives whose decoder-only examples start with a bidirectional prefix (prefix_mask): prompts to a decoder
# trained with one are a prefix too
PREFIX_OBJECTIVES = ("prefix_lm", *MIXTURES)


def check_family(objective: str, family: str) -> None:
    """Raise ValueError unless `objective` can train a model of `family`."""
    if objective not in OBJECTIVE_FAMILIES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVE_FAMILIES)}")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    valid = OBJECTIVE_FAMILIES[objective]
    if family not in valid:
        raise ValueError(
            f"objective {objective!r} cannot train a {family!r} model; "
            f"{objective!r} supports the families: {', '.join(valid)}"
        )


def make_objective(name: str, ids, family: str, **config: Any):
    """Build objective `name` for `family` from the special ids and its config fields, e.g.
    make_objective("mlm", SpecialIds(32000), "encoder", max_length=128)."""
    check_family(name, family)
    module_name, cls_name, config_name, _ = _CLASSES[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, cls_name)(getattr(module, config_name)(**config), ids, family=family)


def objective_config(name: str, args: dict | None, seq_length: int) -> dict:
    """The fields of objective `name`'s config: `args` (the run's objective_args) plus the row length
    train.seq_length in the field the objective reads it from, unless `args` sets it."""
    out = dict(args or {})
    out.setdefault(_CLASSES[name][3], int(seq_length))
    return out


# ----------------------------------------------------------------------------------------- shared helpers
def as_documents(documents) -> list[np.ndarray]:
    """One document (1-D ids) or a sequence of documents -> list of 1-D int32 arrays."""
    if isinstance(documents, np.ndarray):
        if documents.ndim == 1:
            return [documents.astype(np.int32, copy=False)]
        raise ValueError(f"a document must be a 1-D array of token ids, got shape {documents.shape}")
    documents = list(documents)
    if documents and np.isscalar(documents[0]):
        return [np.asarray(documents, dtype=np.int32)]
    out = [np.asarray(d, dtype=np.int32) for d in documents]
    for i, d in enumerate(out):
        if d.ndim != 1:
            raise ValueError(f"document {i} must be a 1-D sequence of token ids, got shape {d.shape}")
    return out


def chunks(tokens: np.ndarray, size: int) -> list[np.ndarray]:
    """Consecutive pieces of at most `size` tokens; an empty document gives one empty piece."""
    if len(tokens) == 0:
        return [tokens]
    return [tokens[i : i + size] for i in range(0, len(tokens), size)]


def shift_right(targets: np.ndarray, start: int) -> np.ndarray:
    """Teacher-forcing inputs: [start, targets[0], ..., targets[-2]] for one unpacked example [L]."""
    return np.concatenate([np.array([start], np.int32), targets[:-1]]).astype(np.int32)


def decoder_example(prefix: np.ndarray, target: np.ndarray, start: int, with_prefix_mask: bool) -> dict:
    """A decoder-only example over `prefix ++ target`: loss only on `target`.

    `prefix_mask` marks the positions whose *inputs* are the start token or prefix tokens (len(prefix) + 1 of
    them): the model lets these attend to each other bidirectionally, so the position predicting target[0]
    already sees the whole prefix, while no position with a loss sees a later target token."""
    sequence = np.concatenate([prefix, target]).astype(np.int32)  # [L]
    index = np.arange(len(sequence))
    example = {
        "inputs": shift_right(sequence, start),
        "targets": sequence,
        "weights": (index >= len(prefix)).astype(np.float32),
    }
    if with_prefix_mask:
        example["prefix_mask"] = index <= len(prefix)
    return example


def encoder_decoder_example(encoder_inputs: np.ndarray, decoder_targets: np.ndarray, start: int) -> dict:
    """An encoder-decoder example; the decoder is teacher-forced from `start` (T5: the pad id)."""
    decoder_targets = np.asarray(decoder_targets, np.int32)
    return {
        "encoder_inputs": np.asarray(encoder_inputs, np.int32),
        "decoder_inputs": shift_right(decoder_targets, start),
        "decoder_targets": decoder_targets,
        "decoder_weights": np.ones(len(decoder_targets), np.float32),
    }

