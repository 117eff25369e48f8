"""Scanned layer stacks (model.scan_layers): the same model as the unrolled stack, from its initial parameters
to its training losses, decoding, LoRA adapters, Hugging Face weights and checkpoints, in either layout; and a
compiled program that hardly grows with depth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax import sharding as shd
from llmjax.checkpoint import check_compatible
from llmjax.generate import generate
from llmjax.models.config import ConfigError
from llmjax.models.transformer import build_model
from llmjax.params import build_with_params, flat_values, stack_layers, unstack_layers
from llmjax.runs import merge_lora_model
from llmjax.state import decay_mask, default_optim_config, make_optimizer
from llmjax.step import batch_shardings, global_batch, make_train_step, model_loss

from test_generate import CONFIGS as DECODING_CONFIGS, enc_prompts
from test_train import _residual_bytes, run_losses, synthetic_batches, tiny_cfg

CASES = {
    "decoder": tiny_cfg(num_layers=3),
    "encoder": tiny_cfg(family="encoder", num_layers=3, position="learned", type_vocab_size=2, norm_position="post",
                        activation="gelu", num_kv_heads=None, tie_embeddings=True),
    # Relative position bias (computed once per stack), cross-attention, more decoder than encoder layers.
    "encoder_decoder": tiny_cfg(family="encoder_decoder", num_layers=2, num_decoder_layers=3, position="relative",
                                num_kv_heads=None),
    # An MoE layer every 2nd layer: each scan step runs a dense block and an MoE block.
    "moe_every_2": tiny_cfg(num_layers=4, num_experts=4, moe_every=2, experts_per_token=2),
}


def _params(model):
    return {k: np.asarray(v) for k, v in flat_values(nnx.state(model, nnx.Param)).items()}


@pytest.mark.parametrize("case", list(CASES))
def test_scanned_init_is_the_unrolled_init_stacked(case):
    cfg = CASES[case]
    unrolled, scanned = build_model(cfg, 0), build_model(cfg.replace(scan_layers=True), 0)
    a, b = _params(unrolled), _params(scanned)
    assert any("/blocks/" in k for k in b) and not any("/layers/" in k for k in b)
    stacked = stack_layers(a, cfg.scan_period)
    assert sorted(stacked) == sorted(b)
    for k in b:
        np.testing.assert_array_equal(stacked[k], b[k], err_msg=k)
    back = unstack_layers(b)
    assert sorted(back) == sorted(a) and all(np.array_equal(back[k], a[k]) for k in a)
    # The stacked axis is the logical axis 'layers'; the dropout streams differ per layer, as unrolled.
    q = scanned.decoder if cfg.family != "encoder" else scanned.encoder
    kernel = q.blocks[0].self_attn.q.kernel
    assert kernel.get_metadata()["logical_axes"] == ("layers", "embed", "heads", "head_dim")
    keys = jax.random.key_data(q.blocks[0].dropout.rngs.key[...])
    assert len({tuple(np.asarray(k).ravel()) for k in keys}) == keys.shape[0]
    # The same forward pass (MoE: with the router statistics, recorded per layer as unrolled).
    batch = {k: jnp.asarray(v) for k, v in synthetic_batches(1, family=cfg.family)[0].items()}
    loss = nnx.jit(lambda m: model_loss(m, batch, deterministic=True)[0])
    np.testing.assert_allclose(float(loss(scanned)), float(loss(unrolled)), rtol=0, atol=1e-5)


def test_scan_needs_whole_moe_periods():
    with pytest.raises(ConfigError, match=r"model.num_layers: 3 layers do not split into scan steps"):
        tiny_cfg(num_layers=3, num_experts=4, moe_every=2, scan_layers=True)
    with pytest.raises(ConfigError, match="model.scan_layers: must be True or False"):
        tiny_cfg(scan_layers="yes")


def _equal_losses(cfg, mesh_cfg, devices=None, family="decoder"):
    batches = synthetic_batches(5, family=family)
    one = jax.devices()[:1]
    unrolled, _, _ = run_losses(cfg, shd.mesh_config(data=1), batches, devices=one)
    scanned, state, _ = run_losses(cfg.replace(scan_layers=True), mesh_cfg, batches, devices=devices)
    np.testing.assert_allclose(scanned, unrolled, rtol=0, atol=1e-5)
    assert np.ptp(unrolled) > 1e-4  # the steps did train
    return state


def test_scanned_train_steps_equal_unrolled_on_one_device():
    """T5 (two scanned stacks, cross-attention, the shared relative bias); the decoder on a data x fsdp x tensor
    mesh is in test_train.py, the forward pass of every case in the init test above."""
    cfg = CASES["encoder_decoder"]
    _equal_losses(cfg, shd.mesh_config(data=1), jax.devices()[:1], family=cfg.family)


def test_scanned_body_runs_under_the_remat_policy():
    cfg = CASES["decoder"].replace(scan_layers=True, num_layers=4, dropout_rate=0.1)
    batch = synthetic_batches(1)[0]
    saved = {p: _residual_bytes(cfg.replace(remat=p), batch) for p in ("none", "save_dots", "full")}
    assert saved["full"] < saved["save_dots"] < saved["none"], saved


def test_weight_decay_skips_the_vectors_of_scanned_layers():
    cfg = CASES["decoder"].replace(scan_layers=True)
    params = nnx.state(build_model(cfg, 0), nnx.Param)
    mask = {k: bool(v) for k, v in flat_values(decay_mask(params, default_optim_config())).items()}
    assert mask["decoder/blocks/0/self_attn_norm/scale"] is False  # [layers, D]: a stack of vectors
    assert mask["decoder/blocks/0/mlp/wi_0/kernel"] is True


@pytest.mark.parametrize("family,kw", [("decoder", dict()), ("encoder_decoder", dict(method="beam", num_beams=3))])
def test_decoding_a_scanned_model_equals_the_unrolled_one(family, kw):
    """Greedy: the prompt's prefill and each step through the stacked caches; beam search: the caches' rows follow
    the beams, and T5's cross-attention K/V are computed once per stacked layer."""
    cfg = DECODING_CONFIGS[family]
    unrolled, scanned = build_model(cfg, 0), build_model(cfg.replace(scan_layers=True), 0)
    prompts = enc_prompts(family)
    a, b = generate(unrolled, prompts, max_new_tokens=6, **kw), generate(scanned, prompts, max_new_tokens=6, **kw)
    assert a.tokens == b.tokens
    np.testing.assert_allclose(b.log_probs, a.log_probs, rtol=1e-5, atol=1e-5)


def test_lora_on_a_scanned_model_merges_as_unrolled():
    cfg = CASES["decoder"].replace(lora_rank=2, lora_targets=("q", "v", "mlp"))
    unrolled = build_model(cfg, 0)
    rng = np.random.default_rng(0)
    for path, var in nnx.iter_graph(unrolled):
        if isinstance(var, nnx.LoRAParam) and path[-1] == "lora_b":
            var[...] = 0.3 * rng.standard_normal(var.shape).astype(np.float32)
    scanned = build_with_params(cfg.replace(scan_layers=True), _params(unrolled))  # adapters converted too
    assert scanned.decoder.blocks[0].mlp.wi_0.lora_b.shape == (3, 2, 64)
    tokens = jnp.arange(24).reshape(2, 12) % 100 + 3
    logits = nnx.jit(lambda m: m(tokens))
    np.testing.assert_allclose(logits(scanned), logits(unrolled), atol=1e-5)
    merged_a, merged_b = merge_lora_model(unrolled), merge_lora_model(scanned)
    assert merged_b.cfg.scan_layers and merged_b.cfg.lora_rank == 0
    np.testing.assert_allclose(logits(merged_b), logits(merged_a), atol=1e-5)
    assert np.abs(logits(merged_b) - logits(build_model(cfg.replace(lora_rank=0), 0))).max() > 1e-3  # adapters count


def test_a_checkpoint_of_one_layout_resumes_only_in_it_and_says_how_to_convert():
    model = CASES["decoder"].__dict__ | {"lora_targets": ["q", "v"]}
    saved = {"model": model, "optim": default_optim_config().to_dict(), "train": {"steps": 10}}
    current = {**saved, "model": {**saved["model"], "scan_layers": True}}
    with pytest.raises(ConfigError) as e:
        check_compatible(saved, current, "W/checkpoints/4")
    msg = str(e.value)
    assert "model.scan_layers (checkpoint False, now True)" in msg
    assert "--init-from W" in msg and "--config.model.scan_layers=True" in msg


def _hlo_size(cfg, batch):
    mesh = shd.make_mesh(shd.mesh_config(data=1), jax.devices()[:1])
    from llmjax.state import init_state_abstract  # noqa: E402 (only this test builds abstract states)

    tx = make_optimizer(default_optim_config(), total_steps=10)
    graphdef, state, state_sh = init_state_abstract(cfg, tx, mesh, shd.rules_dict(shd.DEFAULT_RULES), 0)
    step = make_train_step(graphdef, tx, state_sh, batch_shardings(mesh, batch))
    return len(step.lower(state, global_batch(batch, mesh)).as_text())


def test_the_scanned_program_hardly_grows_with_depth():
    batch = synthetic_batches(1)[0]
    sizes = {(scan, n): _hlo_size(CASES["decoder"].replace(num_layers=n, scan_layers=scan), batch)
             for scan in (False, True) for n in (2, 8)}
    assert sizes[True, 8] < 1.05 * sizes[True, 2], sizes
    assert sizes[False, 8] > 2.5 * sizes[False, 2], sizes


@pytest.mark.parametrize("case", ["t5", "llama"])  # two stacks of 2 and 3 layers with relative bias; GQA and RoPE
def test_hugging_face_weights_import_into_and_export_from_a_scanned_model(case):
    from test_interop import TOL, _batch, _hf_model, _max_diffs  # noqa: E402 (torch only where needed)
    from llmjax.interop import from_hf, to_hf  # noqa: E402

    hf_model, batch = _hf_model(case), _batch(case)
    cfg, model = from_hf(hf_model, scan_layers=True)
    assert cfg.scan_layers and any("/blocks/" in k for k in _params(model))
    diffs = _max_diffs(case, model, hf_model, batch)
    assert max(diffs.values()) <= TOL, diffs
    exported = to_hf(model, attn_implementation="eager")
    original, back = hf_model.state_dict(), exported.state_dict()
    assert list(back) == list(original)
    for name in original:
        np.testing.assert_array_equal(back[name].numpy(), original[name].numpy(), err_msg=name)
