"""T5 span corruption: replace random spans by sentinels in the inputs and predict the spans as targets."""

from __future__ import annotations

import dataclasses

import numpy as np

from llmjax.data.vocab import SpecialIds
from llmjax.objectives import (
    OBJECTIVE_FAMILIES,
    as_documents,
    check_family,
    decoder_example,
    encoder_decoder_example,
)

NAME = "span_corruption"
FAMILIES = OBJECTIVE_FAMILIES[NAME]


def _round(x: float) -> int:
    """Round half to even, as T5 (tf.round in random_spans_noise_mask, Python's round in random_spans_helper):
    70 * 0.15 = 10.5 -> 10 noise tokens, 10 / 3 -> 3 spans."""
    return int(round(x))


def noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(number of noise tokens, number of noise spans) for a sequence of `length` tokens.

    noise = round(length * density) clipped to [1, length - 1]; spans = round(noise / mean span length), at
    least 1 and at most min(noise, length - noise) so that every span of either kind is non-empty; both round
    half to even as T5 does. A sequence of fewer than 2 tokens gets no noise."""
    if length < 2:
        return 0, 0
    num_noise = min(max(_round(length * noise_density), 1), length - 1)
    num_spans = max(_round(num_noise / mean_noise_span_length), 1)
    return num_noise, min(num_spans, num_noise, length - num_noise)


def corrupted_lengths(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(inputs length, targets length), eos included, after corrupting `length` tokens."""
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def span_corruption_lengths(inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0):
    """(raw tokens length, targets length) such that `raw` uncorrupted tokens give exactly `inputs_length`
    inputs (non-noise tokens + one sentinel per span + eos) and `targets` targets (one sentinel per span +
    noise tokens + eos). The T5 default 512 gives (568, 114). The raw length is the largest one that works:
    growing the raw length by one token grows the inputs by 0 or 1, so every inputs length is reachable."""
    best = None
    # inputs >= raw - (raw * density + 0.5) + 1 > inputs_length once raw > inputs_length / (1 - density).
    limit = int(inputs_length / (1.0 - noise_density)) + 2
    for raw in range(1, limit + 1):
        if corrupted_lengths(raw, noise_density, mean_noise_span_length)[0] == inputs_length:
            best = raw
    if best is None:
        raise ValueError(
            f"span_corruption: no raw length gives inputs_length={inputs_length} with noise_density="
            f"{noise_density} and mean_noise_span_length={mean_noise_span_length}; try a longer inputs_length"
        )
    return best, corrupted_lengths(best, noise_density, mean_noise_span_length)[1]


def _random_partition(num_items: int, num_parts: int, rng: np.random.Generator) -> np.ndarray:
    """Uniformly random composition of num_items into num_parts positive lengths [num_parts]."""
    cuts = np.sort(rng.choice(num_items - 1, size=num_parts - 1, replace=False) + 1)
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """[length] bool, True = noise, as T5's random_spans_noise_mask: the noise and non-noise token counts
    (noise_counts) are each split into `spans` random positive lengths, then interleaved. As in T5 the mask
    always starts with a non-noise span and ends with a noise span."""
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    if num_spans == 0:
        return np.zeros(length, bool)
    noise_lengths = _random_partition(num_noise, num_spans, rng)
    keep_lengths = _random_partition(length - num_noise, num_spans, rng)
    span_lengths = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)  # keep, noise, keep, noise, ...
    is_noise = np.tile([False, True], num_spans)
    return np.repeat(is_noise, span_lengths)


def corrupt(tokens: np.ndarray, noise_mask: np.ndarray, ids: SpecialIds) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), both ending in eos: noise span i becomes sentinel i in the inputs, and the targets
    are sentinel 0, span 0, sentinel 1, span 1, ..."""
    tokens = np.asarray(tokens, np.int32)
    starts = noise_mask & ~np.concatenate([[False], noise_mask[:-1]])  # first token of each noise span
    num_spans = int(starts.sum())
    if num_spans > ids.num_sentinels:
        raise ValueError(
            f"span_corruption needs {num_spans} sentinels but the vocabulary has {ids.num_sentinels}; "
            "use a shorter inputs_length, a longer mean_noise_span_length, or more sentinels"
        )
    sentinels = (ids.vocab_size - np.cumsum(starts)).astype(np.int32)  # sentinel(i) = vocab_size - 1 - i
    eos = np.array([ids.eos], np.int32)
    inputs = np.where(starts, sentinels, tokens)[~noise_mask | starts]
    targets = np.insert(tokens[noise_mask], np.flatnonzero(starts[noise_mask]), sentinels[starts])
    return np.concatenate([inputs, eos]), np.concatenate([targets, eos]).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class SpanCorruptionConfig:
    inputs_length: int = 512  # inputs of a full-length example, eos included; targets length is derived
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    # decoder family only: True = the corrupted inputs are a bidirectional prefix (UL2's non-causal decoder);
    # False = one plain causal sequence inputs ++ targets (Raffel et al.'s decoder-only LM with denoising)
    bidirectional_inputs: bool = True

    def __post_init__(self):
        if not 0.0 < self.noise_density < 1.0:
            raise ValueError(f"span_corruption.noise_density must be in (0, 1), got {self.noise_density}")
        if self.mean_noise_span_length < 1.0:
            raise ValueError(
                f"span_corruption.mean_noise_span_length must be >= 1, got {self.mean_noise_span_length}"
            )
        if self.inputs_length < 2:
            raise ValueError(f"span_corruption.inputs_length must be >= 2, got {self.inputs_length}")


class SpanCorruption:
    """Documents, cut into pieces of `raw_length` tokens, -> corrupted examples. A full piece gives exactly
    inputs_length inputs and targets_length targets; a document's last, shorter piece gives shorter ones.

    encoder_decoder:  encoder_inputs = inputs; decoder_targets = targets, decoder_inputs shifted right from pad.
    decoder:          one sequence inputs ++ targets (as UL2): loss only on the targets part, the inputs part
                      a bidirectional prefix (prefix_mask; bidirectional_inputs=False: causal throughout),
                      teacher-forced from bos.
    """

    name = NAME
    families = FAMILIES

    def __init__(self, config: SpanCorruptionConfig, ids: SpecialIds, family: str = "encoder_decoder"):
        check_family(NAME, family)
        self.config, self.ids, self.family = config, ids, family
        self.raw_length, self.targets_length = span_corruption_lengths(
            config.inputs_length, config.noise_density, config.mean_noise_span_length
        )
        spans = noise_counts(self.raw_length, config.noise_density, config.mean_noise_span_length)[1]
        if spans > ids.num_sentinels:
            raise ValueError(
                f"span_corruption.inputs_length={config.inputs_length} makes {spans} noise spans but the "
                f"vocabulary has only {ids.num_sentinels} sentinels; lower inputs_length or raise "
                "mean_noise_span_length"
            )

    @property
    def pack_length(self) -> int | dict[str, int]:
        """The row length(s) that full-length examples fill exactly."""
        if self.family == "decoder":
            return self.config.inputs_length + self.targets_length
        return {"encoder": self.config.inputs_length, "decoder": self.targets_length}

    def example(self, tokens: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One piece of at most raw_length tokens -> one example."""
        c = self.config
        mask = random_spans_noise_mask(len(tokens), c.noise_density, c.mean_noise_span_length, rng)
        inputs, targets = corrupt(tokens, mask, self.ids)
        if self.family == "decoder":
            return decoder_example(inputs, targets, self.ids.bos, with_prefix_mask=c.bidirectional_inputs)
        return encoder_decoder_example(inputs, targets, start=self.ids.pad)

    def __call__(self, documents, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
        n = self.raw_length
        return [
            self.example(doc[i : i + n], rng) for doc in as_documents(documents) for i in range(0, len(doc), n)
        ]
