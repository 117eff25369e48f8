"""Masked language modelling (BERT): corrupt 15% of the regular tokens and predict them, optionally with
whole-word masking and next-sentence prediction (NSP) pairs."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from llmjax.data.vocab import SpecialIds
from llmjax.objectives import OBJECTIVE_FAMILIES, as_documents, check_family

NAME = "mlm"
FAMILIES = OBJECTIVE_FAMILIES[NAME]

# nsp_labels convention, the same as Google's BERT and Hugging Face's BertForPreTraining so that imported NSP
# heads work unchanged: 0 = B is the true next segment, 1 = B is a random segment from another document.
NSP_IS_NEXT = 0
NSP_IS_RANDOM = 1

# Word starts for whole-word masking: either one boolean array per document (True where a word begins), or a
# function from an array of ids to such an array, e.g. `word_start_table(pieces).__getitem__`.
WordStarts = Callable[[np.ndarray], np.ndarray] | Sequence[np.ndarray] | None


@dataclasses.dataclass(frozen=True)
class MLMConfig:
    max_length: int = 512  # example length including [CLS] and [SEP]s
    mask_rate: float = 0.15  # fraction of the regular (non-special) tokens selected for prediction
    max_predictions: int | None = None  # cap on selected tokens per example (BERT: 20 at 128, 80 at 512)
    mask_token_rate: float = 0.8  # selected tokens replaced by [MASK]
    random_token_rate: float = 0.1  # selected tokens replaced by a random regular token; the rest stay unchanged
    whole_word: bool = False  # select whole words (needs word starts, see MLM.__call__)
    nsp: bool = False  # build [CLS] A [SEP] B [SEP] pairs with nsp_labels
    nsp_random_rate: float = 0.5  # fraction of pairs whose B comes from another document

    def __post_init__(self):
        def fail(field, msg):
            raise ValueError(f"mlm.{field}: {msg}")

        if self.max_length < (4 if self.nsp else 3):
            fail("max_length", f"too short for [CLS] ... [SEP] examples: {self.max_length}")
        if not 0.0 < self.mask_rate < 1.0:
            fail("mask_rate", f"must be in (0, 1), got {self.mask_rate}")
        if self.max_predictions is not None and self.max_predictions < 1:
            fail("max_predictions", f"must be >= 1 or None, got {self.max_predictions}")
        if min(self.mask_token_rate, self.random_token_rate) < 0 or self.mask_token_rate + self.random_token_rate > 1:
            fail("mask_token_rate", "mask_token_rate and random_token_rate must be >= 0 and sum to at most 1")
        if not 0.0 <= self.nsp_random_rate <= 1.0:
            fail("nsp_random_rate", f"must be in [0, 1], got {self.nsp_random_rate}")


def word_start_table(pieces: Sequence[str]) -> np.ndarray:
    """[V] bool lookup from a SentencePiece vocabulary: a piece starting with '▁' begins a word. Index it with
    token ids (`table[ids]`) to get word starts."""
    return np.array([p.startswith("\u2581") for p in pieces], dtype=bool)


def regular_mask(tokens: np.ndarray, ids: SpecialIds) -> np.ndarray:
    """True for tokens that may be selected: everything except the reserved pieces and the sentinels."""
    first_regular = ids.first_sentinel - ids.num_regular
    return (tokens >= first_regular) & (tokens < ids.first_sentinel)


def num_to_predict(num_candidates: int, config: MLMConfig) -> int:
    """round(n * rate), at least 1, at most max_predictions. Rounding (half up) rather than flooring keeps the
    long-run rate at mask_rate whatever the example lengths are."""
    if num_candidates == 0:
        return 0
    n = max(1, int(np.floor(num_candidates * config.mask_rate + 0.5)))
    return n if config.max_predictions is None else min(n, config.max_predictions)


def select_positions(
    tokens: np.ndarray, rng: np.random.Generator, config: MLMConfig, ids: SpecialIds, word_starts: np.ndarray | None
) -> np.ndarray:
    """Sorted indices of the tokens to predict in one example [L]."""
    candidates = regular_mask(tokens, ids)  # [L]
    cand_idx = np.flatnonzero(candidates)
    budget = num_to_predict(len(cand_idx), config)
    if budget == 0:
        return cand_idx
    if word_starts is None:
        return np.sort(rng.choice(cand_idx, size=budget, replace=False))
    # A word is a run of regular tokens starting at a word start; a special token (e.g. [SEP]) also ends a word,
    # and a piece that opens an example mid-word counts as the start of its (cut) word.
    previous = np.concatenate([[False], candidates[:-1]])
    starts = candidates & (np.asarray(word_starts, bool) | ~previous)
    words = np.split(cand_idx, np.flatnonzero(starts[cand_idx])[1:])
    chosen, count = [], 0
    # As BERT: visit words in random order and skip any word that would overshoot the budget.
    for w in rng.permutation(len(words)):
        if count + len(words[w]) <= budget:
            chosen.append(words[w])
            count += len(words[w])
            if count == budget:
                break
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def mask_tokens(
    tokens: np.ndarray,
    rng: np.random.Generator,
    config: MLMConfig,
    ids: SpecialIds,
    word_starts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One example [L] -> (inputs [L] int32, targets [L] int32, weights [L] float32).

    targets hold the original id at selected positions and pad elsewhere; weights are 1 exactly there. Each
    selected token independently becomes [MASK] (mask_token_rate), a uniformly random regular token
    (random_token_rate; specials and sentinels never), or stays unchanged (the rest)."""
    tokens = np.asarray(tokens, np.int32)
    selected = select_positions(tokens, rng, config, ids, word_starts)
    draw = rng.random(len(selected))
    to_mask = selected[draw < config.mask_token_rate]
    to_random = selected[(draw >= config.mask_token_rate) & (draw < config.mask_token_rate + config.random_token_rate)]
    inputs = tokens.copy()
    inputs[to_mask] = ids.mask
    inputs[to_random] = rng.integers(ids.first_sentinel - ids.num_regular, ids.first_sentinel, len(to_random))
    targets = np.full_like(tokens, ids.pad)
    targets[selected] = tokens[selected]
    weights = np.zeros(len(tokens), np.float32)
    weights[selected] = 1.0
    return inputs, targets, weights


class MLM:
    """Documents -> BERT examples {inputs, targets, weights, token_type_ids [L]} (+ nsp_labels [] with NSP).

    Without NSP each document is cut into pieces of max_length - 2 tokens, each giving `[CLS] piece [SEP]`.
    With NSP each document is cut into pieces of max_length - 3 tokens; a piece of >= 2 tokens is split at a
    uniformly random point into A and B, and with probability nsp_random_rate B is replaced by a window of the
    same length from another document of the same call (label NSP_IS_RANDOM; the true B is then unused, and
    one-token pieces are dropped). The example is `[CLS] A [SEP] B [SEP]` with token_type_ids 0 up to and
    including the first [SEP] and 1 after it. NSP examples carry a per-example label, so `packing.pack` puts
    each in its own row.
    """

    name = NAME
    families = FAMILIES

    def __init__(self, config: MLMConfig, ids: SpecialIds, family: str = "encoder"):
        check_family(NAME, family)
        self.config, self.ids, self.family = config, ids, family

    @property
    def pack_length(self) -> int:
        """The row length `packing.pack` needs to hold any example."""
        return self.config.max_length

    def _word_starts(self, documents: list[np.ndarray], word_starts: WordStarts) -> list[np.ndarray | None]:
        if not self.config.whole_word:
            return [None] * len(documents)
        if word_starts is None:
            raise ValueError(
                "mlm.whole_word=True needs word starts: pass word_starts= to the MLM objective (a function of the "
                "ids such as word_start_table(pieces).__getitem__, or one boolean array per document)"
            )
        if callable(word_starts):
            out = [np.asarray(word_starts(d), bool) for d in documents]
        else:
            out = [np.asarray(w, bool) for w in word_starts]
            if len(out) != len(documents):
                raise ValueError(f"got {len(out)} word_starts arrays for {len(documents)} documents")
        for i, (d, w) in enumerate(zip(documents, out)):
            if w.shape != d.shape:
                raise ValueError(f"word_starts for document {i} has shape {w.shape}, the document {d.shape}")
        return out

    def _finish(self, parts, starts, rng: np.random.Generator, nsp_label: int | None) -> dict[str, np.ndarray]:
        """parts: token pieces joined as [CLS] p0 [SEP] (p1 [SEP]); starts: their word starts or None."""
        cls, sep = np.array([self.ids.cls], np.int32), np.array([self.ids.sep], np.int32)
        pieces, types = [cls], [np.zeros(1, np.int32)]
        for k, p in enumerate(parts):
            pieces += [p, sep]
            types.append(np.full(len(p) + 1, k, np.int32))
        tokens = np.concatenate(pieces).astype(np.int32)  # [L]
        word_starts = None
        if starts is not None:
            one = np.ones(1, bool)  # the specials are never candidates; any value works here
            word_starts = np.concatenate([one] + [x for w in starts for x in (w, one)])
        inputs, targets, weights = mask_tokens(tokens, rng, self.config, self.ids, word_starts)
        example = {"inputs": inputs, "targets": targets, "weights": weights, "token_type_ids": np.concatenate(types)}
        if nsp_label is not None:
            example["nsp_labels"] = np.array(nsp_label, np.int32)
        return example

    def __call__(
        self, documents, rng: np.random.Generator, word_starts: WordStarts = None
    ) -> list[dict[str, np.ndarray]]:
        """One document or a list of documents -> examples. word_starts is needed for whole-word masking."""
        documents = as_documents(documents)
        starts = self._word_starts(documents, word_starts)
        if not self.config.nsp:
            size = self.config.max_length - 2
            return [
                self._finish([doc[i : i + size]], None if ws is None else [ws[i : i + size]], rng, None)
                for doc, ws in zip(documents, starts)
                for i in range(0, len(doc), size)
            ]
        return self._nsp_examples(documents, starts, rng)

    def _nsp_examples(self, documents, starts, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
        size = self.config.max_length - 3
        nonempty = [i for i, d in enumerate(documents) if len(d)]
        examples = []
        for i, (doc, ws) in enumerate(zip(documents, starts)):
            for begin in range(0, len(doc), size):
                piece = doc[begin : begin + size]
                if len(piece) < 2:
                    continue
                cut = int(rng.integers(1, len(piece)))
                a = slice(begin, begin + cut)
                b_doc, b_ws, b, label = doc, ws, slice(begin + cut, begin + len(piece)), NSP_IS_NEXT
                if rng.random() < self.config.nsp_random_rate:
                    others = [j for j in nonempty if j != i]
                    if not others:
                        raise ValueError(
                            "mlm.nsp needs at least two non-empty documents per call to draw random next segments"
                        )
                    j = others[int(rng.integers(len(others)))]
                    length = len(piece) - cut
                    start = int(rng.integers(0, max(1, len(documents[j]) - length + 1)))
                    b_doc, b_ws, b, label = documents[j], starts[j], slice(start, start + length), NSP_IS_RANDOM
                parts = [doc[a], b_doc[b]]
                examples.append(self._finish(parts, None if ws is None else [ws[a], b_ws[b]], rng, label))
        return examples
