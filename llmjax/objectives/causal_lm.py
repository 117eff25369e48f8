"""Causal language modelling (GPT): predict every next token of each document, eos included."""

from __future__ import annotations

import dataclasses

import numpy as np

from llmjax.data.vocab import SpecialIds
from llmjax.objectives import OBJECTIVE_FAMILIES, as_documents, check_family, shift_right

NAME = "causal_lm"
FAMILIES = OBJECTIVE_FAMILIES[NAME]


@dataclasses.dataclass(frozen=True)
class CausalLMConfig:
    max_length: int = 1024  # longest example; longer documents continue in the next example

    def __post_init__(self):
        if self.max_length < 1:
            raise ValueError(f"causal_lm.max_length must be >= 1, got {self.max_length}")


class CausalLM:
    """document d -> targets = d ++ [eos], inputs = [bos] ++ d (targets shifted right), weight 1 everywhere.

    A document longer than max_length - 1 tokens is cut into consecutive examples of max_length positions; the
    continuation examples start with the real preceding token instead of bos, so no token loses its loss."""

    name = NAME
    families = FAMILIES

    def __init__(self, config: CausalLMConfig, ids: SpecialIds, family: str = "decoder"):
        check_family(NAME, family)
        self.config, self.ids, self.family = config, ids, family

    @property
    def pack_length(self) -> int:
        """The row length `packing.pack` needs to hold any example."""
        return self.config.max_length

    def example(self, document: np.ndarray, rng: np.random.Generator | None = None) -> list[dict[str, np.ndarray]]:
        """One document -> one or more examples {inputs, targets, weights} of shape [L <= max_length]."""
        del rng  # deterministic objective; the argument keeps the interface uniform
        targets = np.concatenate([np.asarray(document, np.int32), [self.ids.eos]]).astype(np.int32)  # [n + 1]
        inputs = shift_right(targets, self.ids.bos)
        size = self.config.max_length
        return [
            {
                "inputs": inputs[i : i + size],
                "targets": targets[i : i + size],
                "weights": np.ones(len(targets[i : i + size]), np.float32),
            }
            for i in range(0, len(targets), size)
        ]

    def __call__(self, documents, rng: np.random.Generator | None = None) -> list[dict[str, np.ndarray]]:
        return [ex for doc in as_documents(documents) for ex in self.example(doc, rng)]
