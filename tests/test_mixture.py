"""Mixtures of denoisers (UL2, UL2R, custom): each denoiser's share of the examples, its span arithmetic
(T5's, per denoiser), mode tokens, decoder-only examples with no loss on the prefix, and config errors."""

from __future__ import annotations

import numpy as np
import pytest

from llmjax.data.vocab import MODE_PIECES, SpecialIds
from llmjax.models.config import ConfigError
from llmjax.objectives import make_objective
from llmjax.objectives.mixture import UL2_DENOISERS, UL2R_DENOISERS
from llmjax.objectives.span_corruption import noise_counts
from test_objectives import reconstruct

IDS = SpecialIds(vocab_size=32000)
FIRST_REGULAR = IDS.first_sentinel - IDS.num_regular


def documents(rng, count, low, high):
    return [rng.integers(FIRST_REGULAR, IDS.first_sentinel, rng.integers(low, high)).astype(np.int32)
            for _ in range(count)]


def split(example, family):
    """(inputs, targets) of an example: the encoder's and decoder's, or a decoder row's prefix and the rest."""
    if family == "encoder_decoder":
        return example["encoder_inputs"], example["decoder_targets"]
    n_in = int(example["prefix_mask"].sum()) - 1  # prefix_mask covers bos and the inputs
    return example["targets"][:n_in], example["targets"][n_in:]


def span_stats(inputs, targets):
    """(noise tokens, spans) of a span-corruption example."""
    spans = int(np.sum(inputs >= IDS.first_sentinel))
    return len(targets) - spans - 1, spans


@pytest.mark.parametrize("name,denoisers", [("ul2", UL2_DENOISERS), ("ul2r", UL2R_DENOISERS)])
def test_shares_follow_the_rates_and_mode_tokens_lead_the_inputs(name, denoisers):
    objective = make_objective(name, IDS, "decoder", max_length=64)
    docs = documents(np.random.default_rng(0), 2500, 100, 1000)
    drawn = objective.examples_by_denoiser(docs, np.random.default_rng(1))
    assert len(drawn) > 20_000
    rates = np.array([d.rate for d in denoisers]) / sum(d.rate for d in denoisers)
    shares = np.bincount([k for k, _ in drawn], minlength=len(denoisers)) / len(drawn)
    np.testing.assert_allclose(shares, rates, atol=0.01)
    for k, example in drawn:
        # decoder rows: bos, then the denoiser's mode token (the first input), then the inputs
        assert example["inputs"][1] == IDS.mode(denoisers[k].mode) == example["targets"][0]
    without = make_objective(name, IDS, "decoder", max_length=64, mode_tokens=False)
    firsts = {int(ex["targets"][0]) for ex in without(documents(np.random.default_rng(0), 50, 100, 1000),
                                                      np.random.default_rng(1))}
    assert not firsts & {IDS.mode(m) for m in MODE_PIECES}


@pytest.mark.parametrize("family", ["encoder_decoder", "decoder"])
def test_every_span_denoiser_has_its_density_and_mean_span_length(family):
    """T5's arithmetic per example (noise = round(n * density), spans = round(noise / mean)), and over all full
    pieces the configured density and mean span length, as far as rounding the span count allows."""
    objective = make_objective("ul2", IDS, family, max_length=2048)
    drawn = objective.examples_by_denoiser(documents(np.random.default_rng(2), 400, 3000, 9000),
                                           np.random.default_rng(3))
    for k, d in enumerate(UL2_DENOISERS):
        if d.objective != "span_corruption":
            continue
        full = objective.piece_lengths[k]
        noise = spans = tokens = 0
        for _, example in filter(lambda e: e[0] == k, drawn):
            inputs, targets = split(example, family)
            assert inputs[0] == IDS.mode(d.mode)
            n, s = span_stats(inputs[1:], targets)
            piece = reconstruct(inputs[1:], targets)
            assert (n, s) == noise_counts(len(piece), d.noise_density, d.mean_noise_span_length)
            if len(piece) == full:
                noise, spans, tokens = noise + n, spans + s, tokens + len(piece)
        assert spans > 0, f"no full piece of denoiser {k}"
        assert abs(noise / tokens - d.noise_density) < 0.005, (k, noise / tokens)
        # a full piece has round(noise / mean) spans: the rounding moves the mean span by at most half a span
        mean, full_spans = d.mean_noise_span_length, noise_counts(full, d.noise_density, d.mean_noise_span_length)[1]
        assert abs(noise / spans - mean) <= 0.5 * mean / full_spans, (k, noise / spans)


def test_decoder_examples_have_no_loss_on_the_prefix():
    objective = make_objective("mixture", IDS, "decoder", max_length=96, denoisers=[
        {"objective": "span_corruption", "rate": 1, "mode": "[NLU]", "noise_density": 0.3},
        {"objective": "prefix_lm", "rate": 1, "mode": "[S2S]"},
        {"objective": "causal_lm", "rate": 1}])
    docs = documents(np.random.default_rng(4), 300, 1, 400)
    drawn = objective.examples_by_denoiser(docs, np.random.default_rng(5))
    assert {k for k, _ in drawn} == {0, 1, 2}
    pieces = []
    for k, ex in drawn:
        mask, weights, targets = ex["prefix_mask"], ex["weights"], ex["targets"]
        n_prefix = int(mask.sum()) - 1
        assert len(targets) <= 96 and mask[0] and np.all(np.diff(mask.astype(int)) <= 0)
        # loss exactly on the targets after the prefix: none on the mode token or on the inputs
        np.testing.assert_array_equal(weights, (np.arange(len(targets)) >= n_prefix).astype(np.float32))
        np.testing.assert_array_equal(ex["inputs"], np.concatenate([[IDS.bos], targets[:-1]]))
        inputs, rest = targets[:n_prefix], targets[n_prefix:]
        if k == 0:
            pieces.append(reconstruct(inputs[1:], rest))
        elif k == 1:
            assert inputs[0] == IDS.mode("[S2S]") and rest[-1] == IDS.eos
            pieces.append(np.concatenate([inputs[1:], rest[:-1]]))
        else:
            assert n_prefix == 0  # causal: no prefix, no mode token
            pieces.append(rest[:-1] if rest[-1] == IDS.eos else rest)
    np.testing.assert_array_equal(np.concatenate(pieces), np.concatenate(docs))  # every token once, in order


def test_encoder_decoder_prefix_lm_denoiser():
    objective = make_objective("ul2r", IDS, "encoder_decoder", max_length=64)
    docs = documents(np.random.default_rng(6), 200, 1, 200)
    for k, ex in objective.examples_by_denoiser(docs, np.random.default_rng(7)):
        assert len(ex["encoder_inputs"]) <= 64 and len(ex["decoder_targets"]) <= 64
        if UL2R_DENOISERS[k].objective == "prefix_lm":
            enc, dec = ex["encoder_inputs"], ex["decoder_targets"]
            assert enc[0] == IDS.mode("[S2S]") and enc[-1] == dec[-1] == IDS.eos


def test_bad_denoisers_are_clear_errors():
    def build(denoisers, family="decoder", **kw):
        return make_objective("mixture", IDS, family, max_length=64, denoisers=denoisers, **kw)

    with pytest.raises(ValueError, match="a mixture needs denoisers"):
        build([])
    with pytest.raises(ValueError, match=r"denoiser 0 \(prefix_lm\): unknown field\(s\) noise_density"):
        build([{"objective": "prefix_lm", "rate": 1, "noise_density": 0.5}])
    with pytest.raises(ValueError, match="denoiser 1: objective must be one of span_corruption, prefix_lm"):
        build([{"objective": "prefix_lm", "rate": 1}, {"objective": "mlm", "rate": 1}])
    with pytest.raises(ValueError, match=r"denoiser 0 \(causal_lm\): mode must be None or one of \[NLU\]"):
        build([{"objective": "causal_lm", "rate": 1, "mode": "[R]"}])
    with pytest.raises(ValueError, match=r"rate must be > 0"):
        build([{"objective": "causal_lm", "rate": 0}])
    with pytest.raises(ValueError, match=r"mixture denoiser 0 \(causal_lm\): causal_lm trains only decoder"):
        build([{"objective": "causal_lm", "rate": 1}], family="encoder_decoder")
    with pytest.raises(ValueError, match=r"denoiser 0 \(span_corruption\): span_corruption.noise_density must"):
        build([{"objective": "span_corruption", "rate": 1, "noise_density": 1.5}])


def test_train_config_check_names_objective_args():
    from llmjax.config import base_config  # the run config machinery, only for this test
    from llmjax.models.config import ModelConfig
    from llmjax.presets import model_preset
    from llmjax.train import check_run_config

    cfg = base_config(objective="ul2", **model_preset("t5_v1_1", "tiny"))
    check_run_config(cfg, ModelConfig.from_dict(cfg.model))
    cfg.objective_args.denoisers = [{"objective": "span_corruption", "rate": 1, "mean_noise_span_length": 0.5}]
    with pytest.raises(ConfigError, match=r"objective_args \(ul2\): ul2 denoiser 0 .*mean_noise_span_length must"):
        check_run_config(cfg, ModelConfig.from_dict(cfg.model))


def test_infill_probe_format_of_a_mixture():
    """llmjax compare probes a mixture's infilling in its first span denoiser's format, with its mode token."""
    ul2 = make_objective("ul2", IDS, "decoder", max_length=64)
    assert ul2.infill_format() == ("span_corruption", IDS.mode("[NLU]"))
    assert make_objective("ul2r", IDS, "encoder_decoder", max_length=64,
                          mode_tokens=False).infill_format() == ("span_corruption", None)
    custom = make_objective("mixture", IDS, "decoder", max_length=64, denoisers=[
        {"objective": "causal_lm", "rate": 1}, {"objective": "prefix_lm", "rate": 1, "mode": "[S2S]"}])
    assert custom.infill_format() == ("prefix_lm", IDS.mode("[S2S]"))
