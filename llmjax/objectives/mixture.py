"""Mixtures of denoisers (UL2, Tay et al. 2022): each example is drawn from one of several denoisers (span
corruption with its own noise density and mean span length, prefix LM with its own split range, causal LM),
with a mode token per denoiser prepended to its inputs. Objective names: `ul2` and `ul2r` (the papers'
mixtures, see UL2_DENOISERS and UL2R_DENOISERS) and `mixture` (the denoisers given in objective_args)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from llmjax.data.vocab import MODE_PIECES, SpecialIds
from llmjax.objectives import (
    OBJECTIVE_FAMILIES,
    as_documents,
    check_family,
    decoder_example,
    encoder_decoder_example,
)
from llmjax.objectives.prefix_lm import PrefixLM, PrefixLMConfig
from llmjax.objectives.span_corruption import (
    SpanCorruption,
    SpanCorruptionConfig,
    corrupt,
    corrupted_lengths,
    noise_counts,
    random_spans_noise_mask,
    span_corruption_lengths,
)

# denoiser objective -> the fields a denoiser of it may set besides objective, rate and mode
DENOISER_FIELDS = {
    "span_corruption": ("noise_density", "mean_noise_span_length"),
    "prefix_lm": ("min_prefix_fraction", "max_prefix_fraction"),
    "causal_lm": (),
}


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """One denoiser of a mixture; a plain dict with these keys works too (objective_args.denoisers)."""

    objective: str  # span_corruption, prefix_lm or causal_lm (decoder family only)
    rate: float  # relative share of the examples; a mixture's rates are normalized to sum to 1
    mode: str | None = None  # mode token prepended to the inputs: '[NLU]', '[NLG]', '[S2S]' or None
    noise_density: float = 0.15  # span_corruption
    mean_noise_span_length: float = 3.0  # span_corruption
    min_prefix_fraction: float = 0.0  # prefix_lm: the prefix is a uniform [min, max] fraction of the piece
    max_prefix_fraction: float = 1.0  # prefix_lm


def _denoiser(i: int, spec) -> Denoiser:
    if isinstance(spec, Denoiser):
        return spec
    if not isinstance(spec, Mapping):
        raise ValueError(f"denoiser {i} must be a dict such as {{'objective': 'span_corruption', 'rate': 0.5}}, "
                         f"got {spec!r}")
    spec = dict(spec)
    objective = spec.get("objective")
    if objective not in DENOISER_FIELDS:
        raise ValueError(f"denoiser {i}: objective must be one of {', '.join(DENOISER_FIELDS)}, got {objective!r}")
    allowed = ("objective", "rate", "mode", *DENOISER_FIELDS[objective])
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise ValueError(f"denoiser {i} ({objective}): unknown field(s) {', '.join(unknown)}; a {objective} "
                         f"denoiser takes {', '.join(allowed)}")
    if "rate" not in spec:
        raise ValueError(f"denoiser {i} ({objective}): set its rate (its share of the examples)")
    return Denoiser(**spec)


@dataclasses.dataclass(frozen=True)
class MixtureConfig:
    max_length: int = 1024  # row length (decoder) or each side's (encoder_decoder); every example fits it
    denoisers: tuple = ()  # Denoiser or dict each
    mode_tokens: bool = True  # prepend each denoiser's mode token to its inputs

    def __post_init__(self):
        object.__setattr__(self, "denoisers", tuple(_denoiser(i, d) for i, d in enumerate(self.denoisers or ())))
        if not self.denoisers:
            raise ValueError("a mixture needs denoisers: set objective_args.denoisers to a list such as "
                             "[{'objective': 'span_corruption', 'rate': 0.5, 'mode': '[NLU]'}, "
                             "{'objective': 'prefix_lm', 'rate': 0.5, 'mode': '[S2S]'}]")
        if self.max_length < 8:
            raise ValueError(f"mixture max_length must be >= 8, got {self.max_length}")
        for i, d in enumerate(self.denoisers):
            if not d.rate > 0:
                raise ValueError(f"denoiser {i} ({d.objective}): rate must be > 0, got {d.rate!r}")
            if d.mode is not None and d.mode not in MODE_PIECES:
                raise ValueError(f"denoiser {i} ({d.objective}): mode must be None or one of "
                                 f"{', '.join(MODE_PIECES)}, got {d.mode!r}")


def _span(mean: float, density: float, mode: str) -> Denoiser:
    return Denoiser("span_corruption", 1.0, mode, noise_density=density, mean_noise_span_length=mean)


# UL2 (Tay et al. 2022, "UL2: Unifying Language Learning Paradigms", arXiv 2205.05131 §3.1.2, Mixture of
# Denoisers): R-denoisers SpanCorrupt(mu, r) = (3, 0.15) and (8, 0.15); X-denoisers (3, 0.5), (8, 0.5), (64, 0.15)
# and (64, 0.5); the S-denoiser (L/4, 0.25, n = 1): one span at the end, a quarter of the text on average. Mode
# tokens: the paper writes [R], [X], [S]; its released checkpoints (and U-PaLM §2.3) use [NLU], [NLG], [S2S].
# Left open by what we could read: the mixing rates and the S-denoiser's split distribution. The paper's appendix
# code (ul2_objective) samples its tasks uniformly unless given rates and builds S with T5's prefix_lm, whose
# random_prefix_noise_mask splits uniformly anywhere in the piece (half of it the target on average); its ablation
# favours a small share of S. Our choices: S 25%, the six span denoisers 12.5% each; the S prefix a uniform
# 50-100% of the piece (its target 0-50%, 25% on average, the paper's r = 0.25).
UL2_DENOISERS = (
    _span(3, 0.15, "[NLU]"), _span(8, 0.15, "[NLU]"),
    _span(3, 0.5, "[NLG]"), _span(8, 0.5, "[NLG]"), _span(64, 0.15, "[NLG]"), _span(64, 0.5, "[NLG]"),
    Denoiser("prefix_lm", 2.0, "[S2S]", min_prefix_fraction=0.5, max_prefix_fraction=1.0),
)
# UL2R (Tay et al. 2022b, "Transcending Scaling Laws with 0.1% Extra Compute", arXiv 2210.11399 §2.3): 50%
# S-denoiser (prefix LM, the split point drawn anywhere in the text: uniform here), 25% R (mean span 3, rate 0.15),
# 25% X, mode tokens [S2S], [NLU], [NLG]. The paper's X has "a mean length of 32 OR a corruption rate of up to
# 50%"; we take one X-denoiser with both (mean span 32 at density 0.5).
UL2R_DENOISERS = (
    Denoiser("prefix_lm", 0.5, "[S2S]"),
    Denoiser("span_corruption", 0.25, "[NLU]", noise_density=0.15, mean_noise_span_length=3.0),
    Denoiser("span_corruption", 0.25, "[NLG]", noise_density=0.5, mean_noise_span_length=32.0),
)


@dataclasses.dataclass(frozen=True)
class UL2Config(MixtureConfig):
    denoisers: tuple = UL2_DENOISERS


@dataclasses.dataclass(frozen=True)
class UL2RConfig(MixtureConfig):
    denoisers: tuple = UL2R_DENOISERS


class Mixture:
    """A document is cut into consecutive pieces; for each piece a denoiser is drawn (with its rate) from the
    objective's rng, and the piece, of that denoiser's length, becomes one example:

      span_corruption: inputs = the piece with noise spans replaced by sentinels, targets = the spans (T5's
                       random_spans_noise_mask arithmetic); pieces as long as fit max_length (and at most as
                       many spans as the vocabulary has sentinels)
      prefix_lm:       inputs = piece[:s], targets = piece[s:] ++ [eos] (eos also ends the encoder inputs)
      causal_lm:       inputs = [], targets = the piece (++ [eos] at the document's end); decoder only

    The mode token, if any, is prepended to the inputs. encoder_decoder: encoder_inputs = inputs, decoder
    targets = targets; decoder: one sequence inputs ++ targets, the inputs a bidirectional prefix
    (prefix_mask), loss only on the targets (decoder_example)."""

    name = "mixture"

    def __init__(self, config: MixtureConfig, ids: SpecialIds, family: str = "encoder_decoder"):
        check_family(self.name, family)
        self.config, self.ids, self.family = config, ids, family
        rates = np.array([d.rate for d in config.denoisers], np.float64)
        self.rates = rates / rates.sum()
        self._modes, self._parts, self.piece_lengths = [], [], []
        for i, d in enumerate(config.denoisers):
            mode = np.array([ids.mode(d.mode)] if config.mode_tokens and d.mode else [], np.int32)
            try:
                part, piece = self._part(d, len(mode))
            except ValueError as e:
                raise ValueError(f"{self.name} denoiser {i} ({d.objective}): {e}") from None
            self._modes.append(mode)
            self._parts.append(part)
            self.piece_lengths.append(piece)

    @property
    def families(self) -> tuple[str, ...]:
        return OBJECTIVE_FAMILIES[self.name]

    @property
    def pack_length(self) -> int | dict[str, int]:
        """The row length(s) `packing.pack` needs to hold any example."""
        if self.family == "encoder_decoder":
            return {"encoder": self.config.max_length, "decoder": self.config.max_length}
        return self.config.max_length

    def infill_format(self) -> tuple[str, int | None]:
        """(objective, mode token id or None) whose example format an infilling probe of a model trained on
        this mixture uses: its first span-corruption denoiser's, else its first prefix-LM one's, else causal."""
        return self.format_for(("span_corruption", "prefix_lm", "causal_lm"))

    def format_for(self, preference: tuple[str, ...]) -> tuple[str, int | None]:
        """(objective, mode token id or None) of the first denoiser whose objective comes first in
        `preference` (e.g. a sequence-to-sequence task: the prefix-LM denoiser's [S2S], as UL2's mode switching
        does for generation)."""
        for objective in (*preference, *DENOISER_FIELDS):  # then any denoiser
            for d, mode in zip(self.config.denoisers, self._modes):
                if d.objective == objective:
                    return objective, (int(mode[0]) if len(mode) else None)
        raise AssertionError("a mixture has at least one denoiser")

    def _part(self, d: Denoiser, mode_length: int):
        """(the denoiser's objective, the longest piece of document it takes) for max_length."""
        length = self.config.max_length
        if d.objective == "causal_lm":
            if self.family != "decoder":
                raise ValueError(f"causal_lm trains only decoder models, not {self.family!r} ones")
            return None, length - mode_length - 1
        if d.objective == "prefix_lm":
            prefix_lm = PrefixLM(PrefixLMConfig(length - mode_length, d.min_prefix_fraction, d.max_prefix_fraction),
                                 self.ids, family=self.family)
            return prefix_lm, length - mode_length - 1
        SpanCorruptionConfig(length, d.noise_density, d.mean_noise_span_length)  # its checks, before the fitting
        inputs_length = self._span_inputs_length(d, mode_length)
        span = SpanCorruption(SpanCorruptionConfig(inputs_length, d.noise_density, d.mean_noise_span_length),
                              self.ids, family=self.family)
        return span, span.raw_length

    def _span_inputs_length(self, d: Denoiser, mode_length: int) -> int:
        """The longest inputs_length whose full pieces fit max_length (inputs, mode token included, and targets
        in one row for a decoder; each on its side for encoder_decoder) with a sentinel for every span."""
        length, density, mean = self.config.max_length, d.noise_density, d.mean_noise_span_length

        def fits(raw: int) -> bool:
            inputs, targets = corrupted_lengths(raw, density, mean)
            if noise_counts(raw, density, mean)[1] > self.ids.num_sentinels:
                return False
            if self.family == "decoder":
                return mode_length + inputs + targets <= length
            return mode_length + inputs <= length and targets <= length

        raw = 1  # both corrupted lengths grow with the raw length, so the longest piece that fits is one scan away
        while fits(raw + 1):
            raw += 1
        inputs_length = corrupted_lengths(raw, density, mean)[0]
        # span_corruption_lengths takes the longest raw piece giving inputs_length, which may have more targets
        while inputs_length > 2 and not fits(span_corruption_lengths(inputs_length, density, mean)[0]):
            inputs_length -= 1
        if not fits(span_corruption_lengths(inputs_length, density, mean)[0]):
            raise ValueError(f"max_length={length} is too short for span corruption at noise_density={density}")
        return inputs_length

    def _inputs_targets(self, k: int, piece: np.ndarray, last: bool, rng: np.random.Generator):
        """(inputs, targets) of denoiser k for one piece; `last`: the piece ends its document."""
        d, part, eos = self.config.denoisers[k], self._parts[k], np.array([self.ids.eos], np.int32)
        if d.objective == "span_corruption":
            mask = random_spans_noise_mask(len(piece), d.noise_density, d.mean_noise_span_length, rng)
            return corrupt(piece, mask, self.ids)
        if d.objective == "prefix_lm":
            s = part.split_point(len(piece), rng)
            prefix = np.concatenate([piece[:s], eos]) if self.family == "encoder_decoder" else piece[:s]
            return prefix, np.concatenate([piece[s:], eos])
        return piece[:0], np.concatenate([piece, eos]) if last else piece

    def examples_by_denoiser(self, documents, rng: np.random.Generator) -> list[tuple[int, dict[str, np.ndarray]]]:
        """[(index of the denoiser drawn, example)] in document order."""
        out = []
        for doc in as_documents(documents):
            start = 0
            while start < len(doc):
                k = int(rng.choice(len(self.rates), p=self.rates))
                piece = doc[start : start + self.piece_lengths[k]]
                start += len(piece)
                inputs, targets = self._inputs_targets(k, piece, start == len(doc), rng)
                inputs = np.concatenate([self._modes[k], inputs]).astype(np.int32)
                if self.family == "decoder":
                    out.append((k, decoder_example(inputs, targets, self.ids.bos, with_prefix_mask=True)))
                else:
                    out.append((k, encoder_decoder_example(inputs, targets, start=self.ids.pad)))
        return out

    def __call__(self, documents, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
        return [example for _, example in self.examples_by_denoiser(documents, rng)]


class UL2(Mixture):
    name = "ul2"


class UL2R(Mixture):
    name = "ul2r"
