"""What each objective trains the model on: its loss and the weights that normalize it.

A loss function is `loss_fn(model, batch, *, label_smoothing, z_loss, deterministic) -> (total, {part:
LossSums})` over the batch keys of llmjax.data.packing; a weights function `weights_fn(batch) -> {part: total
weight}` (data only, known before the forward pass). The train step divides each part's summed loss by its
weight over the whole global batch. A new objective whose examples carry the usual keys uses `lm_loss`; one
with other outputs adds its functions here and names them in OBJECTIVE_LOSS.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from llmjax.objectives import OBJECTIVE_FAMILIES, losses


def lm_loss(model, batch: dict, *, label_smoothing: float = 0.0, z_loss: float = 0.0, deterministic: bool = True):
    """Token cross-entropy on the targets: decoder-only rows (inputs/targets/weights, optional prefix_mask) or
    encoder-decoder rows (encoder_inputs, decoder_inputs/targets/weights)."""
    kw = dict(label_smoothing=label_smoothing, z_loss=z_loss)
    if "encoder_inputs" in batch:
        logits = model(batch["encoder_inputs"], batch["decoder_inputs"], batch["encoder_segment_ids"],
                       batch["decoder_segment_ids"], batch["encoder_positions"], batch["decoder_positions"],
                       deterministic=deterministic)
        sums = {"lm": losses.cross_entropy(logits, batch["decoder_targets"], batch["decoder_weights"], **kw)}
    else:
        logits = model(batch["inputs"], batch["segment_ids"], batch["positions"],
                       prefix_mask=batch.get("prefix_mask"), deterministic=deterministic)
        sums = {"lm": losses.cross_entropy(logits, batch["targets"], batch["weights"], **kw)}
    return sums["lm"].loss, sums


MLM_GATHER_FRACTION = 0.25  # positions per row given to the MLM head (BERT selects 15%); 1.0 = every position


def mlm_loss(model, batch: dict, *, label_smoothing: float = 0.0, z_loss: float = 0.0, deterministic: bool = True):
    """Masked-token cross-entropy of an encoder, plus next-sentence prediction when the rows carry NSP labels
    and the model has its head (part "nsp").

    As BERT's own implementation does (`gather_indexes`, max_predictions_per_seq), the MLM head and its
    vocabulary projection see only the selected positions: the K = MLM_GATHER_FRACTION * T positions of each
    row with the largest weights, which hold every selected token whenever a row has at most K of them; a
    batch with a fuller row takes the head over every position instead (lax.cond), so the sums are always
    those of the full head. The gathered path never builds the full [B, T, V] logits, the largest activation
    of a BERT step."""
    out = model(batch["inputs"], batch["segment_ids"], batch["positions"], batch.get("token_type_ids"),
                deterministic=deterministic)
    hidden, targets, weights = out["hidden"], batch["targets"], batch["weights"]
    kw = dict(label_smoothing=label_smoothing, z_loss=z_loss)
    k = min(hidden.shape[1], max(1, math.ceil(MLM_GATHER_FRACTION * hidden.shape[1])))

    def gathered(hidden):
        _, idx = jax.lax.top_k((weights != 0).astype(jnp.float32), k)  # [B, K]: every selected position first
        pick = lambda a: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)
        return losses.cross_entropy(model.mlm_logits(pick(hidden)), pick(targets), pick(weights), **kw)

    def full(hidden):
        return losses.cross_entropy(model.mlm_logits(hidden), targets, weights, **kw)

    if k == hidden.shape[1]:
        mlm = full(hidden)
    else:
        fits = jnp.max(jnp.sum((weights != 0).astype(jnp.int32), axis=1)) <= k
        mlm = jax.lax.cond(fits, gathered, full, hidden)
    sums = {"lm": mlm}
    if "nsp_labels" in batch and "nsp_logits" in out:
        sums["nsp"] = losses.cross_entropy(out["nsp_logits"], batch["nsp_labels"], batch.get("nsp_weights"))
    return sums["lm"].loss, sums


def token_weights(batch: dict) -> dict:
    """Total weight of each loss part: the target tokens' weights ("lm"), and the NSP pairs when present."""
    w = batch["decoder_weights"] if "decoder_weights" in batch else batch["weights"]
    out = {"lm": jnp.sum(w.astype(jnp.float32))}
    if "nsp_labels" in batch:
        nw = batch.get("nsp_weights")
        out["nsp"] = (jnp.sum(nw.astype(jnp.float32)) if nw is not None
                      else jnp.asarray(batch["nsp_labels"].size, jnp.float32))
    return out


# objective name -> (loss_fn, weights_fn)
OBJECTIVE_LOSS = {
    "causal_lm": (lm_loss, token_weights),
    "prefix_lm": (lm_loss, token_weights),
    "span_corruption": (lm_loss, token_weights),
    "mlm": (mlm_loss, token_weights),
    "ul2": (lm_loss, token_weights),
    "ul2r": (lm_loss, token_weights),
    "mixture": (lm_loss, token_weights),
}
assert set(OBJECTIVE_LOSS) == set(OBJECTIVE_FAMILIES), "every objective names its loss"


def objective_loss(objective: str):
    """(loss_fn, weights_fn) that train `objective`."""
    if objective not in OBJECTIVE_LOSS:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVE_LOSS)}")
    return OBJECTIVE_LOSS[objective]


def family_loss(model, batch: dict, **kw):
    """The loss of a batch made by the model family's classic objective (MLM for encoders, next-token cross-
    entropy otherwise): the default of the train and eval steps when no objective or task loss is given."""
    return (mlm_loss if model.cfg.family == "encoder" else lm_loss)(model, batch, **kw)
