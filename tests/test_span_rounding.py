"""Span corruption counts noise tokens and spans with T5's rounding (round half to even), so that lengths and
masks match T5's `random_spans_noise_mask` and `random_spans_helper` (t5/data/preprocessors.py)."""

import numpy as np
import pytest

from llmjax.objectives.span_corruption import (
    corrupted_lengths,
    noise_counts,
    random_spans_noise_mask,
    span_corruption_lengths,
)


def t5_noise_counts(length, noise_density=0.15, mean_noise_span_length=3.0):
    """T5's random_spans_noise_mask arithmetic, written out."""
    num_noise_tokens = int(round(length * noise_density))
    num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)
    num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
    num_noise_spans = max(num_noise_spans, 1)
    return num_noise_tokens, num_noise_spans


def t5_random_spans_helper(inputs_length=512, noise_density=0.15, mean_noise_span_length=3.0):
    """T5's random_spans_helper (extra_tokens_per_span_inputs = extra_tokens_per_span_targets = 1), written out:
    (tokens_length, targets_length)."""
    def lengths(tokens_length):
        num_noise_tokens = int(round(tokens_length * noise_density))
        num_nonnoise_tokens = tokens_length - num_noise_tokens
        num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
        return num_nonnoise_tokens + num_noise_spans + 1, num_noise_tokens + num_noise_spans + 1

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def test_half_rounds_to_even_as_t5():
    # 70 * 0.15 = 10.5 -> 10 noise tokens (not 11); 10 / 3 = 3.33 -> 3 spans (not 4)
    assert t5_noise_counts(70) == (10, 3)
    assert noise_counts(70, 0.15, 3.0) == (10, 3)
    assert corrupted_lengths(70, 0.15, 3.0) == (70 - 10 + 3 + 1, 10 + 3 + 1)
    mask = random_spans_noise_mask(70, 0.15, 3.0, np.random.default_rng(0))
    assert mask.sum() == 10
    assert int((mask & ~np.concatenate([[False], mask[:-1]])).sum()) == 3  # noise spans


def test_noise_counts_match_t5():
    for length in range(2, 3000):
        assert noise_counts(length, 0.15, 3.0) == t5_noise_counts(length), length


@pytest.mark.parametrize("density,mean", [(0.15, 3.0), (0.25, 3.0), (0.5, 8.0), (0.15, 8.0)])
def test_noise_counts_match_t5_other_settings(density, mean):
    for length in range(2, 1200):
        expected = t5_noise_counts(length, density, mean)
        expected = (expected[0], min(expected[1], expected[0], length - expected[0]))  # spans of both kinds fit
        assert noise_counts(length, density, mean) == expected, length


@pytest.mark.parametrize("inputs_length,expected", [(64, (70, 14)), (512, (568, 114))])
def test_lengths_as_t5_random_spans_helper(inputs_length, expected):
    assert t5_random_spans_helper(inputs_length) == expected
    assert span_corruption_lengths(inputs_length, 0.15, 3.0) == expected


@pytest.mark.parametrize("inputs_length", [16, 32, 64, 100, 128, 200, 256, 512, 626, 1024, 2048])
def test_lengths_match_t5_random_spans_helper(inputs_length):
    raw, targets = span_corruption_lengths(inputs_length, 0.15, 3.0)
    assert (raw, targets) == t5_random_spans_helper(inputs_length)
    assert corrupted_lengths(raw, 0.15, 3.0)[0] == inputs_length
