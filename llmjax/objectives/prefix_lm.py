"""Prefix language modelling: split each document at a random point, see the prefix, predict the suffix."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from llmjax.data.vocab import SpecialIds
from llmjax.objectives import (
    OBJECTIVE_FAMILIES,
    as_documents,
    check_family,
    chunks,
    decoder_example,
    encoder_decoder_example,
)

NAME = "prefix_lm"
FAMILIES = OBJECTIVE_FAMILIES[NAME]


@dataclasses.dataclass(frozen=True)
class PrefixLMConfig:
    max_length: int = 1024  # longest example (each side for encoder_decoder)
    # The prefix length is drawn uniformly from [min, max] * n for a document (chunk) of n tokens, and clipped
    # to [1, n - 1] so that both the prefix and the suffix hold at least one document token when n >= 2.
    min_prefix_fraction: float = 0.0
    max_prefix_fraction: float = 1.0

    def __post_init__(self):
        if self.max_length < 3:
            raise ValueError(f"prefix_lm.max_length must be >= 3 (prefix, suffix and eos), got {self.max_length}")
        if not 0.0 <= self.min_prefix_fraction <= self.max_prefix_fraction <= 1.0:
            raise ValueError(
                "prefix_lm needs 0 <= min_prefix_fraction <= max_prefix_fraction <= 1, got "
                f"min_prefix_fraction={self.min_prefix_fraction}, max_prefix_fraction={self.max_prefix_fraction}"
            )


class PrefixLM:
    """Split a document d (chunked to max_length - 1 tokens) at s into prefix d[:s] and suffix d[s:].

    decoder:          targets = d ++ [eos], inputs = [bos] ++ d, weights 1 on the suffix and eos only,
                      prefix_mask True on the s + 1 positions whose inputs are bos or prefix tokens.
    encoder_decoder:  encoder_inputs = d[:s] ++ [eos]; decoder_targets = d[s:] ++ [eos], decoder_inputs the
                      targets shifted right from pad (T5's start token), weight 1 everywhere.
    """

    name = NAME
    families = FAMILIES

    def __init__(self, config: PrefixLMConfig, ids: SpecialIds, family: str = "decoder"):
        check_family(NAME, family)
        self.config, self.ids, self.family = config, ids, family

    @property
    def pack_length(self) -> int | dict[str, int]:
        """The row length(s) `packing.pack` needs to hold any example."""
        if self.family == "encoder_decoder":
            return {"encoder": self.config.max_length, "decoder": self.config.max_length}
        return self.config.max_length

    def split_point(self, n: int, rng: np.random.Generator) -> int:
        """Prefix length for a document of n tokens (see PrefixLMConfig)."""
        if n < 2:
            return n  # nothing to split: a lone token is the prefix and eos the whole suffix
        lo = min(max(1, math.ceil(self.config.min_prefix_fraction * n)), n - 1)
        hi = max(lo, min(n - 1, math.floor(self.config.max_prefix_fraction * n)))
        return int(rng.integers(lo, hi + 1))

    def example(self, document: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One document of at most max_length - 1 tokens -> one example."""
        document = np.asarray(document, np.int32)
        s = self.split_point(len(document), rng)
        eos = np.array([self.ids.eos], np.int32)
        if self.family == "encoder_decoder":
            return encoder_decoder_example(
                np.concatenate([document[:s], eos]), np.concatenate([document[s:], eos]), start=self.ids.pad
            )
        return decoder_example(document[:s], np.concatenate([document[s:], eos]), self.ids.bos, with_prefix_mask=True)

    def __call__(self, documents, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
        return [
            self.example(piece, rng)
            for doc in as_documents(documents)
            for piece in chunks(doc, self.config.max_length - 1)
        ]
