"""The sharded train step: same losses on 1 and 8 devices, FSDP really shards, accumulation is exact,
remat saves memory, and bad layouts fail at start."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax import sharding as shd
from llmjax.state import decay_mask, default_optim_config, init_state, learning_rate_schedule, make_optimizer
from llmjax.step import batch_shardings, global_batch, make_train_step, model_loss
from llmjax.models.config import ConfigError, ModelConfig

V = 128


def tiny_cfg(**kw):
    fields = dict(family="decoder", vocab_size=V, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, max_length=32,
                  activation="swiglu", norm="rmsnorm", position="rope", num_kv_heads=2, tie_embeddings=False)
    fields.update(kw)
    return ModelConfig(**fields)


def synthetic_batches(n, batch=8, length=16, seed=0, family="decoder"):
    """Packed causal-LM rows: two documents per row, the last tokens padding."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(7, V, (batch, length + 1)).astype(np.int32)
        seg = np.ones((batch, length), np.int32)
        seg[:, length // 2:] = 2
        seg[:, -2:] = 0
        pos = np.concatenate([np.arange(length // 2), np.arange(length - length // 2)])[None].repeat(batch, 0)
        b = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": (seg > 0).astype(np.float32),
             "segment_ids": seg, "positions": pos.astype(np.int32)}
        if family == "encoder_decoder":
            b = {"encoder_inputs": b["inputs"], "encoder_segment_ids": seg, "encoder_positions": b["positions"],
                 "decoder_inputs": b["inputs"], "decoder_targets": b["targets"], "decoder_weights": b["weights"],
                 "decoder_segment_ids": seg, "decoder_positions": b["positions"]}
        out.append(b)
    return out


def optim(**kw):
    c = default_optim_config()
    c.update({"learning_rate": 1e-2, "warmup_steps": 2, **kw})
    return c


def run_losses(model_cfg, mesh_cfg, batches, *, micro_batches=1, devices=None, rules=shd.DEFAULT_RULES):
    mesh = shd.make_mesh(mesh_cfg, devices)
    shd.validate_layout(model_cfg, mesh, batches[0]["inputs" if "inputs" in batches[0] else "encoder_inputs"].shape[0],
                        micro_batches)
    tx = make_optimizer(optim(), total_steps=10)
    graphdef, state, state_sh = init_state(model_cfg, tx, mesh, shd.rules_dict(rules), seed=0)
    batch_sh = batch_shardings(mesh, batches[0])
    # With the rules, as `llmjax train` builds it: modules see the mesh (context parallelism, expert parallelism).
    step = make_train_step(graphdef, tx, state_sh, batch_sh, micro_batches=micro_batches, rules=shd.rules_dict(rules))
    losses = []
    for b in batches:
        state, metrics = step(state, global_batch(b, mesh))
        losses.append(float(metrics["loss"]))
    return np.array(losses), state, (graphdef, tx, state_sh, batch_sh, mesh)


def test_one_device_equals_eight_devices_data_fsdp_tensor():
    """Also scanned (model.scan_layers, under a remat policy) on the mesh: the first 5 losses of the unrolled
    stack on one device within 1e-5."""
    cfg = tiny_cfg()
    batches = synthetic_batches(5)
    one, _, _ = run_losses(cfg, shd.mesh_config(data=1), batches, devices=jax.devices()[:1])
    eight, state, (_, _, state_sh, _, mesh) = run_losses(cfg, shd.mesh_config(data=2, fsdp=2, tensor=2), batches)
    np.testing.assert_allclose(eight, one, rtol=1e-5)
    assert one[-1] < one[0]  # it does learn
    # The parameters really are spread over the mesh.
    wi = state.params["decoder"]["layers"][0]["mlp"]["wi_0"]["kernel"].get_value()
    assert wi.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert wi.addressable_shards[0].data.shape == (16, 32)

    scanned, state, _ = run_losses(cfg.replace(scan_layers=True, remat="save_dots"),
                                   shd.mesh_config(data=2, fsdp=2, tensor=2), batches)
    np.testing.assert_allclose(scanned, one, rtol=0, atol=1e-5)
    wi = state.params["decoder"]["blocks"][0]["mlp"]["wi_0"]["kernel"].get_value()
    assert wi.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")  # 'layers' unsharded by default
    assert wi.addressable_shards[0].data.shape == (2, 16, 32)


def test_slices_span_only_their_dcn_axes():
    """mesh.dcn_data=2 on 8 devices (CPUs have no slices: consecutive devices stand for them): the data axis is
    2 slices x 2 within each, and each slice holds whole fsdp x tensor groups."""
    mesh = shd.make_mesh(shd.mesh_config(data=2, fsdp=2, dcn_data=2))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1, "expert": 1, "context": 1}
    slice_of = {d.id: d.id // 4 for d in jax.devices()}
    grid = np.vectorize(lambda d: slice_of[d.id])(mesh.devices)
    assert (grid[:2] == 0).all() and (grid[2:] == 1).all()  # only the data axis crosses slices
    with pytest.raises(ConfigError, match="mesh: the dcn_\\* axes ask for 3 slices"):
        shd.make_mesh(shd.mesh_config(dcn_fsdp=3))
    with pytest.raises(ConfigError, match="mesh.dcn_data: the number of slices"):
        shd.make_mesh(shd.mesh_config(dcn_data=0))


def _bytes(tree):
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "addressable_shards"))


def _total_bytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


def test_fsdp8_holds_an_eighth_of_params_and_optimizer_state():
    cfg = tiny_cfg(d_model=64, mlp_dim=128, num_heads=8, num_kv_heads=8)
    batches = synthetic_batches(1, batch=8)
    _, state, (graphdef, tx, state_sh, batch_sh, mesh) = run_losses(cfg, shd.mesh_config(data=1, fsdp=8), batches)
    for part in (state.params, state.opt_state):
        per_device, total = _bytes(part), _total_bytes(part)
        assert per_device < total / 8 * 1.1, (per_device, total)  # ~1/8 (norm scales are replicated, tiny)
    # The compiled step's memory analysis agrees: its arguments are about 1/8 of the unsharded state.
    step = make_train_step(graphdef, tx, state_sh, batch_sh)
    compiled = step.lower(state, global_batch(batches[0], mesh)).compile()
    mem = compiled.memory_analysis()
    state_bytes = _total_bytes(state.params) + _total_bytes(state.opt_state)
    assert mem.argument_size_in_bytes < state_bytes / 8 * 1.3


def test_gradient_accumulation_equals_one_big_step():
    cfg = tiny_cfg()
    big = synthetic_batches(3, batch=16)
    mesh = shd.mesh_config(data=1)
    full, s_full, _ = run_losses(cfg, mesh, big, devices=jax.devices()[:1])
    acc, s_acc, _ = run_losses(cfg, mesh, big, micro_batches=4, devices=jax.devices()[:1])
    np.testing.assert_allclose(acc, full, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s_full.params), jax.tree.leaves(s_acc.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def _residual_bytes(model_cfg, batch):
    """Bytes the forward pass saves for the backward pass (JAX's view, before XLA scheduling)."""
    from llmjax.models.transformer import build_model

    graphdef, params, rest = nnx.split(build_model(model_cfg, 0), nnx.Param, ...)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def loss(p):
        model = nnx.merge(graphdef, p, rest, copy=True)
        return model_loss(model, batch, deterministic=False)[0]

    # The vjp closure holds exactly the residuals; evaluate its shapes without running anything.
    residuals = jax.eval_shape(lambda p: jax.tree.leaves(jax.vjp(loss, p)[1]), params)
    return sum(np.prod(a.shape) * a.dtype.itemsize for a in residuals)


def test_remat_reduces_saved_activations_with_same_losses():
    """Full remat keeps only each block's input; save_dots keeps matmul outputs but not the elementwise
    activations. (XLA:CPU's buffer assignment does not show this in memory_analysis(); the TPU
    ahead-of-time compile of `llmjax compile` does.) On T5, whose stacks cover the decoder-only model's blocks
    (causal self-attention) and more: bidirectional and cross-attention, the relative bias. (A scanned decoder
    under save_dots on a mesh: test_one_device_equals_eight_devices_data_fsdp_tensor.)"""
    family = "encoder_decoder"
    kw = dict(family=family, d_model=64, mlp_dim=256, num_layers=2, dropout_rate=0.1, position="relative",
              num_kv_heads=None)
    batches = synthetic_batches(2, batch=4, length=64, family=family)
    saved, losses = {}, {}
    for policy in ("none", "save_dots", "full"):
        cfg = tiny_cfg(remat=policy, **kw)
        saved[policy] = _residual_bytes(cfg, batches[0])
        losses[policy], _, _ = run_losses(cfg, shd.mesh_config(data=1), batches, devices=jax.devices()[:1])
    np.testing.assert_allclose(losses["full"], losses["none"], rtol=1e-5)
    np.testing.assert_allclose(losses["save_dots"], losses["none"], rtol=1e-5)
    assert saved["full"] < 0.3 * saved["none"], saved
    assert saved["full"] < saved["save_dots"] < saved["none"], saved


def test_invalid_layouts_fail_at_start_with_the_fix():
    cfg = tiny_cfg(num_heads=4, num_kv_heads=2)
    with pytest.raises(ConfigError, match="mesh: .* = 4 devices, but there are 8 devices"):
        shd.make_mesh(shd.mesh_config(data=2, fsdp=2, tensor=1))
    with pytest.raises(ConfigError, match="at most one axis may be -1"):
        shd.make_mesh(shd.mesh_config(data=-1, fsdp=-1))
    mesh = shd.make_mesh(shd.mesh_config(data=8))
    with pytest.raises(ConfigError, match=r"train\.batch_size.*multiple of 8"):
        shd.validate_layout(cfg, mesh, 12)
    mesh = shd.make_mesh(shd.mesh_config(data=1, tensor=8))
    with pytest.raises(ConfigError, match=r"mesh\.tensor=8 does not divide model\.num_heads=4"):
        shd.validate_layout(cfg, mesh, 8)
    with pytest.raises(ConfigError, match="mapped twice"):
        shd.rules_dict([("embed", "fsdp"), ("embed", "tensor")])
    mesh = shd.make_mesh(shd.mesh_config(data=1, fsdp=2, tensor=4))
    with pytest.raises(ConfigError, match="both mapped to mesh axis 'fsdp'"):
        abstract = nnx.eval_shape(lambda: __import__("llmjax.models.transformer", fromlist=["x"]).build_model(cfg, 0))
        shd.state_shardings(nnx.state(abstract, nnx.Param), mesh, shd.rules_dict([("embed", "fsdp"), ("mlp", "fsdp")]))


def test_schedules_and_decay_mask():
    c = optim(schedule="cosine", warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1)
    lr = learning_rate_schedule(c, 110)
    assert float(lr(0)) == 0.0 and abs(float(lr(10)) - 1.0) < 1e-6 and abs(float(lr(110)) - 0.1) < 1e-6
    rs = learning_rate_schedule(optim(schedule="rsqrt", warmup_steps=100, learning_rate=1.0), 1000)
    # T5's inverse square root: lr(step) = peak * sqrt(warmup / step) once past warmup.
    assert abs(float(rs(100)) - 1.0) < 1e-6 and abs(float(rs(300)) - np.sqrt(100 / 300)) < 1e-6
    lin = learning_rate_schedule(optim(schedule="linear", warmup_steps=0, learning_rate=1.0, min_lr_ratio=0.0), 100)
    assert abs(float(lin(50)) - 0.5) < 1e-6
    model = nnx.eval_shape(lambda: __import__("llmjax.models.transformer", fromlist=["x"]).build_model(tiny_cfg(), 0))
    mask = dict((("/".join(map(str, p))), v.get_value()) for p, v in
                nnx.to_flat_state(decay_mask(nnx.state(model, nnx.Param), optim())))
    assert mask["decoder/layers/0/mlp/wi_0/kernel"] and mask["lm_head/proj/kernel"]
    assert not mask["embedder/tokens/embedding"] and not mask["decoder/layers/0/mlp_norm/scale"]
    with pytest.raises(ConfigError, match="optim.schedule"):
        learning_rate_schedule(optim(schedule="step"), 10)


@pytest.mark.parametrize("variant", ["adafactor", "bfloat16", "z_loss_label_smoothing"])
def test_optimizer_and_precision_variants_learn(variant):
    """Adafactor (T5 recipes), bfloat16 compute with float32 master weights, z-loss + label smoothing:
    each trains (loss falls) and keeps float32 parameters."""
    cfg = tiny_cfg(dtype="bfloat16") if variant == "bfloat16" else tiny_cfg()
    oc = optim(optimizer="adafactor", schedule="constant", learning_rate=0.5) if variant == "adafactor" else optim()
    mesh = shd.make_mesh(shd.mesh_config(data=1), jax.devices()[:1])
    tx = make_optimizer(oc, total_steps=12)
    graphdef, state, state_sh = init_state(cfg, tx, mesh, shd.rules_dict(shd.DEFAULT_RULES), seed=0)
    batches = synthetic_batches(1) * 12  # the same batch: the loss must fall fast
    kw = dict(z_loss=1e-4, label_smoothing=0.1) if variant == "z_loss_label_smoothing" else {}
    step = make_train_step(graphdef, tx, state_sh, batch_shardings(mesh, batches[0]), **kw)
    losses = []
    for b in batches:
        state, m = step(state, global_batch(b, mesh))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
