"""Mixture of experts: Mixtral parity with transformers, one expert = the dense MLP, capacity vs dropless
dispatch and the exact dropped count, the load-balancing loss, expert parallelism on 8 simulated devices, the
router losses in the train step (with remat and micro-batches), and moe_tiny end to end."""

import importlib
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llmjax import sharding as shd
from llmjax.state import default_optim_config, init_state, make_optimizer
from llmjax.step import batch_shardings, global_batch, make_eval_step, make_train_step
from llmjax.config import load_config, model_config
from llmjax.models import moe
from llmjax.models.config import ConfigError, ModelConfig
from llmjax.models.flops import forward_macs
from llmjax.models.layers import MLP, count_params
from llmjax.models.transformer import build_model

V = 128
CONFIGS = pathlib.Path(__file__).parent.parent / "configs"


def moe_cfg(**kw) -> ModelConfig:
    fields = dict(family="decoder", vocab_size=V, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                  max_length=32, activation="swiglu", norm="rmsnorm", position="rope", use_bias=False,
                  tie_embeddings=False, num_experts=4, experts_per_token=2)
    fields.update(kw)
    return ModelConfig(**fields)


def run_layer(layer, x, mask=None, *, mesh=None, rules=None, state=None):
    """(output, statistics) of an MoE layer, jit-compiled; under `mesh` with activation constraints."""
    graphdef, own_state = nnx.split(layer)

    @jax.jit
    def f(state, x, mask):
        with shd.activation_layout(mesh, rules), moe.collect_stats() as stats:
            y = nnx.merge(graphdef, state)(x, mask)
        return y, stats[0]

    return f(own_state if state is None else state, x, mask), f


def inputs(b=4, t=16, d=32, seed=1, pad=3):
    x = jax.random.normal(jax.random.key(seed), (b, t, d), jnp.float32)
    mask = jnp.ones((b, t), bool).at[1:, t - pad:].set(False)  # right padding on all rows but the first
    return x, mask


# ------------------------------------------------------------------------------------- numpy reference
def np_act(name, h):
    if name in ("swiglu", "silu"):
        return h / (1 + np.exp(-h))
    if name in ("gelu", "geglu"):
        return np.asarray(jax.nn.gelu(h, approximate=False))
    raise ValueError(name)


def np_expert(layer, e, x, activation):
    ex = layer.experts
    if ex.gated:
        h = np_act(activation, x @ np.asarray(ex.wi_0.kernel[...][e])) * (x @ np.asarray(ex.wi_1.kernel[...][e]))
    else:
        h = np_act(activation, x @ np.asarray(ex.wi.kernel[...][e]))
    return h @ np.asarray(ex.wo.kernel[...][e])


def np_capacity_moe(layer, cfg, x, mask):
    """Independent capacity routing: per row, expert buffers of C slots filled by first choices in token order,
    then second choices; returns (output, dropped assignments)."""
    x, mask = np.asarray(x, np.float64), np.asarray(mask)
    logits = x @ np.asarray(layer.router[...], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    k, e_num = cfg.experts_per_token, cfg.num_experts
    top = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    w = np.take_along_axis(probs, top, -1)
    if cfg.moe_renormalize:
        w = w / w.sum(-1, keepdims=True)
    b, t, _ = x.shape
    cap = min(t, math.ceil(cfg.moe_capacity_factor * t * k / e_num))
    y, dropped = np.zeros_like(x), 0
    for r in range(b):
        used = np.zeros(e_num, int)
        for j in range(k):
            for i in range(t):
                if not mask[r, i]:
                    continue
                e = top[r, i, j]
                if used[e] < cap:
                    used[e] += 1
                    y[r, i] += w[r, i, j] * np_expert(layer, e, x[r, i], cfg.activation)
                else:
                    dropped += 1
    return y, dropped, top


# ------------------------------------------------------------------------------------------- parity
def _hf_mixtral():
    torch = importlib.import_module("torch")
    transformers = importlib.import_module("transformers")
    torch.manual_seed(0)
    c = transformers.MixtralConfig(
        vocab_size=160, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-3,
        rope_parameters={"rope_type": "default", "rope_theta": 100.0}, attn_implementation="eager")
    model = transformers.MixtralForCausalLM(c)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _padded_batch():
    rng = np.random.default_rng(0)
    mask = (np.arange(7)[None] < np.array([7, 5, 3])[:, None]).astype(np.int64)
    return rng.integers(1, 160, mask.shape) * mask, mask


def _hf_logits(model, ids, mask):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


@nnx.jit
def _logits(model, tokens, segment_ids):
    return model(tokens, segment_ids)


def test_mixtral_import_matches_transformers_and_exports_back():
    from llmjax.interop import from_hf, hf, to_hf

    hf_model = _hf_mixtral()
    ids, mask = _padded_batch()
    cfg, model = from_hf(hf_model)
    assert (cfg.num_experts, cfg.experts_per_token, cfg.moe_renormalize, cfg.moe_capacity_factor) == (4, 2, True, 0.0)
    assert cfg.num_kv_heads == 2 and cfg.activation == "swiglu" and not cfg.tie_embeddings
    ref = _hf_logits(hf_model, ids, mask)
    ours = np.asarray(_logits(model, ids, mask))
    diff = float(np.abs(ours - ref)[mask.astype(bool)].max())
    print(f"Mixtral import: max abs logit diff {diff:.2e}")
    assert diff <= 1e-4
    # The router really routes: tokens do not all go to the same experts.
    with moe.collect_stats() as stats:
        _ = model(ids, mask)
    assert float(stats[0]["load"].max()) < 0.9
    # Export: the HF model built from our weights gives the same logits, and re-import is exact.
    back = to_hf(model, attn_implementation="eager")
    assert type(back).__name__ == "MixtralForCausalLM"
    diff_back = float(np.abs(_hf_logits(back, ids, mask) - ref)[mask.astype(bool)].max())
    print(f"Mixtral export: max abs logit diff {diff_back:.2e}")
    assert diff_back <= 1e-5
    _, again = from_hf(back)
    a = hf.flatten(nnx.state(model, nnx.Param).to_pure_dict())
    b = hf.flatten(nnx.state(again, nnx.Param).to_pure_dict())
    assert a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def test_mixtral_export_refuses_what_mixtral_cannot_express():
    from llmjax.interop import InteropError, to_hf

    for kw, field in [(dict(moe_capacity_factor=1.0), "moe_capacity_factor"), (dict(moe_every=2), "moe_every"),
                      (dict(moe_shared_expert=True), "moe_shared_expert")]:
        with pytest.raises(InteropError, match=field):
            to_hf(build_model(moe_cfg(**kw), 0))


# --------------------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("activation,use_bias", [("swiglu", False), ("gelu", True)])
@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_one_expert_top1_equals_dense_mlp(activation, use_bias, capacity_factor):
    cfg = moe_cfg(num_experts=1, experts_per_token=1, moe_renormalize=False, activation=activation,
                  use_bias=use_bias, moe_capacity_factor=capacity_factor)
    layer = moe.MoE(cfg, rngs=nnx.Rngs(0))
    dense = MLP(cfg, rngs=nnx.Rngs(1))
    names = ["wi_0", "wi_1", "wo"] if cfg.gated else ["wi", "wo"]
    rng = np.random.default_rng(0)
    for name in names:
        lin, exp = getattr(dense, name), getattr(layer.experts, name)
        lin.kernel.set_value(jnp.asarray(rng.normal(0, 0.3, lin.kernel.shape), jnp.float32))
        exp.kernel.set_value(lin.kernel[...][None])
        if use_bias:
            lin.bias.set_value(jnp.asarray(rng.normal(0, 0.3, lin.bias.shape), jnp.float32))
            exp.bias.set_value(lin.bias[...][None])
    x, _ = inputs()
    (y, stats), _ = run_layer(layer, x)  # no mask: every token is real
    np.testing.assert_allclose(np.asarray(y), np.asarray(dense(x)), atol=1e-6, rtol=1e-6)
    assert float(stats["dropped"]) == 0.0 and float(stats["aux_loss"]) == pytest.approx(1.0)


@pytest.mark.parametrize("k", [1, 2])
def test_capacity_dispatch_equals_dropless_when_capacity_suffices(k):
    cfg = moe_cfg(experts_per_token=k, moe_renormalize=k > 1)
    layer = moe.MoE(cfg, rngs=nnx.Rngs(0))
    x, mask = inputs()
    (dropless, s0), _ = run_layer(layer, x, mask)
    big = moe.MoE(cfg.replace(moe_capacity_factor=cfg.num_experts / k), rngs=nnx.Rngs(0))  # C = T slots
    assert big.capacity(x.shape[1]) == x.shape[1]
    (capacity, s1), _ = run_layer(big, x, mask)
    m = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(capacity)[m], np.asarray(dropless)[m], atol=1e-6)
    assert float(s1["dropped"]) == 0.0 and float(s0["dropped"]) == 0.0
    assert float(s1["routed"]) == k * m.sum()
    assert np.all(np.asarray(capacity)[~m] == 0) and np.all(np.asarray(dropless)[~m] == 0)  # padding: no expert


@pytest.mark.parametrize("k,factor", [(2, 0.5), (1, 0.75), (2, 1.0)])
def test_small_capacity_drops_exactly_the_overflow(k, factor):
    cfg = moe_cfg(experts_per_token=k, moe_renormalize=k > 1, moe_capacity_factor=factor)
    layer = moe.MoE(cfg, rngs=nnx.Rngs(0))
    # Tokens skewed towards a few experts so that capacity really binds.
    x, mask = inputs()
    x = x + 2.0 * jnp.asarray(np.asarray(layer.router[...])[:, 0])[None, None]
    (y, stats), _ = run_layer(layer, x, mask)
    ref, dropped, top = np_capacity_moe(layer, cfg, x, mask)
    # The count the capacity implies: per row and expert, every assignment beyond C slots is dropped.
    t = x.shape[1]
    cap = math.ceil(factor * t * k / cfg.num_experts)
    m = np.asarray(mask)
    counts = np.stack([np.bincount(top[r][m[r]].ravel(), minlength=cfg.num_experts) for r in range(x.shape[0])])
    implied = int(np.maximum(counts - cap, 0).sum())
    assert implied > 0 and dropped == implied
    assert float(stats["dropped"]) == implied
    assert float(stats["routed"]) == k * m.sum()
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)


def test_load_balancing_loss_is_one_for_uniform_routing_and_larger_when_skewed():
    e = 4
    cfg = ModelConfig(family="decoder", vocab_size=V, d_model=8, num_heads=2, num_layers=1, mlp_dim=8,
                      num_experts=e, experts_per_token=2)
    layer = moe.MoE(cfg, rngs=nnx.Rngs(0))
    layer.router.set_value(jnp.concatenate([jnp.eye(e), jnp.zeros((4, e))]))  # logits = first 4 features
    t = 8
    # Uniform: token i prefers expert i%4 (logit 3), then (i+1)%4 (logit 2): every expert gets the same share of
    # assignments and, by symmetry, the same mean probability.
    first, second = np.arange(t) % e, (np.arange(t) + 1) % e
    logits = 3 * np.eye(e)[first] + 2 * np.eye(e)[second]
    x = jnp.asarray(np.pad(logits, ((0, 0), (0, 4))))[None]
    (_, stats), _ = run_layer(layer, x, jnp.ones((1, t), bool))
    assert float(stats["aux_loss"]) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(np.asarray(stats["load"]), np.full(e, 1 / e), atol=1e-7)
    # Skewed: every token prefers experts 0 then 1.
    skew = np.tile(3 * np.eye(e)[0] + 2 * np.eye(e)[1], (t, 1))
    (_, stats), _ = run_layer(layer, jnp.asarray(np.pad(skew, ((0, 0), (0, 4))))[None], jnp.ones((1, t), bool))
    p = np.exp(skew[0]) / np.exp(skew[0]).sum()
    expected = e * (0.5 * p[0] + 0.5 * p[1])  # f = (1/2, 1/2, 0, 0)
    assert float(stats["aux_loss"]) == pytest.approx(expected, rel=1e-6) and expected > 1.5
    # z-loss: mean logsumexp^2.
    assert float(stats["z_loss"]) == pytest.approx(float(np.log(np.exp(skew[0]).sum()) ** 2), rel=1e-6)


def test_top_k_matches_lax_top_k_including_ties():
    p = jax.nn.softmax(jax.random.normal(jax.random.key(0), (64, 8)), -1)
    p = p.at[:4].set(1 / 8)  # all tied
    for k in (1, 2, 3):
        w, i = moe.top_k(p, k)
        w_ref, i_ref = jax.lax.top_k(p, k)
        np.testing.assert_array_equal(np.asarray(i), np.asarray(i_ref))
        np.testing.assert_array_equal(np.asarray(w), np.asarray(w_ref))


# ------------------------------------------------------------------------------------ expert parallel
@pytest.mark.parametrize("mesh_sizes", [dict(data=2, expert=4), dict(data=1, fsdp=2, tensor=2, expert=2)],
                         ids=["data2_expert4", "fsdp2_tensor2_expert2"])
@pytest.mark.parametrize("capacity_factor", [2.0, 0.0], ids=["capacity", "dropless"])
def test_expert_parallel_equals_unsharded(capacity_factor, mesh_sizes):
    assert jax.device_count() == 8
    cfg = moe_cfg(num_experts=8, experts_per_token=2, moe_capacity_factor=capacity_factor, mlp_dim=64)
    layer = moe.MoE(cfg, rngs=nnx.Rngs(0))
    x, mask = inputs(b=8)
    (ref, ref_stats), _ = run_layer(layer, x, mask)

    mesh = shd.make_mesh(shd.mesh_config(**mesh_sizes))
    ep, fsdp, tp = (mesh_sizes.get(a, 1) for a in ("expert", "fsdp", "tensor"))
    rules = shd.rules_dict(shd.DEFAULT_RULES)
    state = nnx.state(layer)
    sharded = jax.device_put(state, shd.state_shardings(state, mesh, rules))
    xs = jax.device_put(x, shd.batch_sharding(mesh, 3))
    ms = jax.device_put(mask, shd.batch_sharding(mesh, 2))
    (out, stats), fn = run_layer(layer, xs, ms, mesh=mesh, rules=rules, state=sharded)
    diff = float(np.abs(np.asarray(out) - np.asarray(ref)).max())
    print(f"expert parallel ({'capacity' if capacity_factor else 'dropless'}): max abs diff {diff:.2e}")
    assert diff <= 1e-5
    for key in ("aux_loss", "z_loss", "dropped", "load"):
        np.testing.assert_allclose(np.asarray(stats[key]), np.asarray(ref_stats[key]), rtol=1e-5, atol=1e-6)
    # Each device holds 1/ep of the experts (8/ep of 8), and of those its fsdp / tensor slice.
    for lin in ("wi_0", "wi_1", "wo"):
        kernel = sharded["experts"][lin]["kernel"].get_value()
        assert kernel.sharding.spec[0] == "expert"
        d_div, f_div = (fsdp, tp) if lin != "wo" else (tp, fsdp)
        for shard in kernel.addressable_shards:
            assert shard.data.shape == (8 // ep, kernel.shape[1] // d_div, kernel.shape[2] // f_div)
            assert shard.data.size * ep * fsdp * tp == kernel.size
    hlo = fn.lower(sharded, xs, ms).compile().as_text()
    if capacity_factor:  # dispatch and combine move token slots between devices with an all-to-all
        assert "all-to-all" in hlo
    else:  # each expert group gathers its tokens, runs its experts, reduce-scatters the outputs
        assert "all-gather" in hlo and "reduce-scatter" in hlo


# ------------------------------------------------------------------------------------------ training
def _batches(n, batch=8, length=16, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(7, V, (batch, length + 1)).astype(np.int32)
        seg = np.ones((batch, length), np.int32)
        seg[:, length // 2:] = 2
        seg[:, -2:] = 0
        pos = np.concatenate([np.arange(length // 2), np.arange(length - length // 2)])[None].repeat(batch, 0)
        out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": (seg > 0).astype(np.float32),
                    "segment_ids": seg, "positions": pos.astype(np.int32)})
    return out


def _train(cfg, batches, *, tx=None, mesh_cfg=None, micro_batches=1):
    """Per-step metrics and the final state of train steps on `batches` (1 device unless `mesh_cfg`)."""
    mesh = shd.make_mesh(mesh_cfg) if mesh_cfg is not None else shd.make_mesh(shd.mesh_config(data=1),
                                                                               jax.devices()[:1])
    rules = shd.rules_dict(shd.DEFAULT_RULES)
    if tx is None:
        c = default_optim_config()
        c.update(learning_rate=1e-2, warmup_steps=2)
        tx = make_optimizer(c, total_steps=10)
    graphdef, state, state_sh = init_state(cfg, tx, mesh, rules, seed=0)
    batch_sh = batch_shardings(mesh, batches[0])
    step = make_train_step(graphdef, tx, state_sh, batch_sh, micro_batches=micro_batches, rules=rules)
    history = []
    for b in batches:
        state, metrics = step(state, global_batch(b, mesh))
        history.append({k: np.asarray(v) for k, v in metrics.items()})
    return history, state, graphdef


def _routers(params):
    layers = params["decoder"]["layers"]
    return [np.asarray(layers[i]["mlp"]["router"].get_value()) for i in sorted(layers)]


@pytest.mark.parametrize("remat,micro_batches", [("none", 1), ("full", 2)])
def test_aux_loss_gives_the_router_gradients_in_the_train_step(remat, micro_batches):
    """Top-1 with renormalised gates: every gate weight is 1, so the LM loss gives the router no gradient and
    only the load-balancing loss moves it. With plain SGD (lr 1, no decay, no clipping) the router's update in
    the train step must be minus the gradient of weight * mean-over-layers aux loss, computed here on its own
    (per micro-batch, averaged)."""
    weight = 0.5
    cfg = moe_cfg(experts_per_token=1, moe_renormalize=True, moe_z_loss_weight=0.0, moe_aux_loss_weight=weight,
                  remat=remat)
    batch = _batches(1)[0]
    tx = optax.sgd(1.0)
    mesh = shd.make_mesh(shd.mesh_config(data=1), jax.devices()[:1])
    graphdef, start, _ = init_state(cfg, tx, mesh, shd.rules_dict(shd.DEFAULT_RULES), seed=0)

    @jax.jit
    @jax.grad
    def aux_grad(params, rows):
        model = nnx.merge(graphdef, params, start.rest, copy=True)
        with moe.collect_stats() as stats:
            model(rows["inputs"], rows["segment_ids"], rows["positions"], deterministic=False)
        return weight * sum(s["aux_loss"] for s in stats) / len(stats)

    parts = np.array_split(np.arange(batch["inputs"].shape[0]), micro_batches)
    grads = [aux_grad(start.params, {k: v[r] for k, v in batch.items()}) for r in parts]
    expected = [-sum(g) / micro_batches for g in zip(*(_routers(g) for g in grads))]
    r0 = _routers(start.params)

    history, state, _ = _train(cfg, [batch], tx=tx, micro_batches=micro_batches)
    moved = [r - r_0 for r, r_0 in zip(_routers(state.params), r0)]
    assert max(np.abs(e).max() for e in expected) > 1e-3  # the aux loss has a real router gradient ...
    for m, e in zip(moved, expected):  # ... and it is exactly what moves the router in the train step
        np.testing.assert_allclose(m, e, rtol=1e-4, atol=1e-7)
    m = history[0]
    assert m["moe_aux_loss"] >= 1.0 - 1e-6 and m["moe_dropped_fraction"] == 0.0
    assert sum(m[f"moe_load_{i}"] for i in range(4)) == pytest.approx(1.0, abs=1e-5)


def test_remat_and_micro_batches_keep_the_moe_metrics():
    batches = _batches(2)
    cfg = moe_cfg(moe_capacity_factor=1.0, moe_z_loss_weight=1e-3)
    plain, _, _ = _train(cfg, batches)
    remat, _, _ = _train(cfg.replace(remat="full"), batches)
    for a, b in zip(plain, remat):
        for key in ("loss", "moe_aux_loss", "moe_z_loss", "moe_dropped_fraction", "moe_load_0"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7)
    assert plain[0]["moe_dropped_fraction"] > 0  # capacity 1.0 drops some assignments
    micro, _, _ = _train(cfg.replace(remat="save_dots"), batches, micro_batches=2)
    assert micro[0]["loss"] == pytest.approx(float(plain[0]["loss"]), rel=1e-5)
    assert 0.9 < micro[0]["moe_aux_loss"] < 2.0 and np.isfinite(micro[-1]["grad_norm"])


@pytest.mark.parametrize("capacity_factor", [1.0, 0.0], ids=["capacity", "dropless"])
def test_train_steps_on_expert_parallel_mesh_equal_one_device(capacity_factor):
    cfg = moe_cfg(num_experts=8, moe_capacity_factor=capacity_factor)
    batches = _batches(3)
    one, _, _ = _train(cfg, batches)
    eight, state, _ = _train(cfg, batches, mesh_cfg=shd.mesh_config(data=2, expert=4))
    np.testing.assert_allclose([m["loss"] for m in eight], [m["loss"] for m in one], rtol=1e-5)
    np.testing.assert_allclose([m["moe_aux_loss"] for m in eight], [m["moe_aux_loss"] for m in one], rtol=1e-5)
    kernel = state.params["decoder"]["layers"][0]["mlp"]["experts"]["wi_0"]["kernel"].get_value()
    assert kernel.addressable_shards[0].data.shape[0] == 2


def test_dense_models_report_no_moe_metrics():
    history, _, _ = _train(moe_cfg(num_experts=0), _batches(1))
    assert not any(k.startswith("moe_") for k in history[0])


# -------------------------------------------------------------------------------- models and configs
def test_moe_every_and_shared_expert_and_other_families():
    cfg = moe_cfg(moe_every=2, num_layers=4, moe_shared_expert=True, moe_mlp_dim=16)
    model = build_model(cfg, 0)
    kinds = [type(layer.mlp).__name__ for layer in model.decoder.layers]
    assert kinds == ["MLP", "MoE", "MLP", "MoE"]
    assert model.decoder.layers[1].mlp.experts.wo.kernel.shape == (4, 16, 32)
    assert model.decoder.layers[1].mlp.shared.wo.kernel.shape == (16, 32)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        assert len(var.get_metadata()["logical_axes"]) == var.get_value().ndim, path
    tokens = jnp.asarray(np.random.default_rng(0).integers(7, V, (2, 8)))
    assert _moe_layers_run(model, tokens) == 2
    t5 = build_model(ModelConfig(family="encoder_decoder", vocab_size=V, d_model=32, num_layers=2, num_heads=4,
                                 mlp_dim=32, position="relative", norm="rmsnorm", num_experts=2,
                                 experts_per_token=1, moe_renormalize=False), 0)
    assert _moe_layers_run(t5, tokens, tokens) == 4  # both stacks
    bert = build_model(ModelConfig(family="encoder", vocab_size=V, d_model=32, num_layers=2, num_heads=4,
                                   mlp_dim=32, num_experts=2, experts_per_token=1, moe_renormalize=False), 0)
    assert _moe_layers_run(bert, tokens) == 2


def _moe_layers_run(model, *args) -> int:
    """How many MoE layers report statistics in one forward pass (traced abstractly: nothing is computed)."""
    graphdef, state = nnx.split(model)

    def forward(state):
        with moe.collect_stats() as stats:
            nnx.merge(graphdef, state)(*args)
        return [s["aux_loss"] for s in stats]

    return len(jax.eval_shape(forward, state))


def test_kv_cached_decoding_and_generate_with_experts():
    """Dropless routing is per token, so incremental decoding with the KV cache reproduces the full forward."""
    from llmjax.generate import generate

    cfg = moe_cfg()
    model = build_model(cfg, 0)
    tokens = jnp.asarray(np.random.default_rng(3).integers(7, V, (2, 10)))
    full = nnx.jit(lambda m, t: m(t))(model, tokens)
    step = nnx.jit(lambda m, tok, pos, cache: m(tok, positions=pos, cache=cache))
    logits, cache = step(model, tokens[:, :6], jnp.tile(jnp.arange(6), (2, 1)), model.init_cache(2, 12))
    steps = [logits]
    for t in range(6, 10):
        logits, cache = step(model, tokens[:, t:t + 1], jnp.full((2, 1), t, jnp.int32), cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5)
    out = generate(model, [[3, 9, 12], [3, 40]], max_new_tokens=4, method="greedy")
    assert np.asarray(out.tokens).shape == (2, 4)


def test_flops_count_active_experts():
    cfg = moe_cfg(num_experts=8, experts_per_token=2, moe_shared_expert=True, moe_every=2, num_layers=4)
    dense = cfg.replace(num_experts=0, moe_shared_expert=False, moe_every=1)
    per_expert = 3 * cfg.d_model * cfg.mlp_dim
    extra = 2 * (cfg.d_model * 8 + 2 * per_expert)  # 2 MoE layers: router + (top-2 + shared - dense MLP)
    assert forward_macs(cfg, 10) == forward_macs(dense, 10) + 10 * extra


def test_mixtral_8x7b_parameter_count_without_allocating():
    cfg = model_config(load_config(CONFIGS / "mixtral_8x7b.py"))
    n = count_params(nnx.state(nnx.eval_shape(lambda: build_model(cfg, 0)), nnx.Param))
    expert = 3 * cfg.d_model * cfg.mlp_dim
    active = n - cfg.num_layers * (cfg.num_experts - cfg.experts_per_token) * expert
    print(f"mixtral_8x7b: {n:,} parameters, {active:,} active per token")
    assert n == 46_702_792_704 and abs(n - 46.7e9) / 46.7e9 < 0.001
    assert abs(active - 12.9e9) / 12.9e9 < 0.005
    # FLOPs count the active parameters: a 1-token forward pass = active matmul weights + 1x1 attention scores.
    embedding_and_norms = cfg.vocab_size * cfg.d_model + (2 * cfg.num_layers + 1) * cfg.d_model
    scores = cfg.num_layers * 2 * cfg.num_heads * cfg.head_size
    assert forward_macs(cfg, 1) == active - embedding_and_norms + scores
    tiny = model_config(load_config(CONFIGS / "moe_tiny.py"))
    assert tiny.num_experts == 4 and build_model(tiny, 0) is not None


@pytest.mark.parametrize("fields,name", [
    (dict(num_experts=-1), "model.num_experts"),
    (dict(experts_per_token=5), "model.experts_per_token"),
    (dict(moe_every=0), "model.moe_every"),
    (dict(moe_every=3), "model.moe_every"),
    (dict(moe_capacity_factor=-1.0), "model.moe_capacity_factor"),
    (dict(moe_mlp_dim=0), "model.moe_mlp_dim"),
    (dict(moe_aux_loss_weight=-0.1), "model.moe_aux_loss_weight"),
    (dict(moe_router_jitter=1.0), "model.moe_router_jitter"),
    (dict(num_experts=0, moe_shared_expert=True), "model.moe_shared_expert"),
])
def test_invalid_moe_config_names_the_field(fields, name):
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        moe_cfg(**fields)


def test_expert_axis_must_divide_the_experts():
    mesh = shd.make_mesh(shd.mesh_config(data=2, expert=4))
    with pytest.raises(ConfigError, match=r"mesh\.expert=4 does not divide model\.num_experts=6"):
        shd.validate_layout(moe_cfg(num_experts=6), mesh, global_batch_size=8)
    shd.validate_layout(moe_cfg(num_experts=8), mesh, global_batch_size=8)


def test_router_jitter_only_in_training():
    cfg = moe_cfg(moe_router_jitter=0.5)
    layer = moe.MoE(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    x, _ = inputs()
    a = layer.route(x, deterministic=True)[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(layer.route(x, deterministic=True)[0]))
    assert np.abs(np.asarray(layer.route(x, deterministic=False)[0]) - np.asarray(a)).max() > 1e-3


# -------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_moe_tiny_trains_and_validation_loss_falls(tmp_path, small_corpus_dir):
    from helpers.cli_process import run_cli  # (imported here: only this end-to-end test needs them)
    from helpers.golden import check_first_losses
    from llmjax.metrics import read_metrics

    workdir = tmp_path / "moe_tiny"
    small = ["--config.data.max_documents=600", "--config.data.vocab_size=1500", "--config.model.vocab_size=1500",
             "--config.train.steps=40", "--config.train.log_every=1", "--config.train.eval_every=20",
             "--config.train.eval_batches=4", "--config.train.num_samples=0", "--config.train.batch_size=8",
             "--config.train.seed=0", f"--config.data.data_dir={small_corpus_dir}"]  # prepared once (conftest)
    # 2 devices, both on the expert axis: the experts are split over devices
    run_cli(["train", f"--config={CONFIGS / 'moe_tiny.py'}", f"--workdir={workdir}", *small, "--config.mesh.data=1",
             "--config.mesh.expert=2"], devices=2)
    rows = read_metrics(workdir)
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    trains = [r for r in rows if "train/loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0] - 1.0, evals
    check_first_losses("moe_tiny", rows)  # the golden losses (helpers/golden.py)
    last = trains[-1]
    assert 0.99 < last["train/moe_aux_loss"] < 1.5 and last["train/moe_dropped_fraction"] == 0.0
    assert sum(last[f"train/moe_load_{i}"] for i in range(4)) == pytest.approx(1.0, abs=1e-4)
    assert "eval/moe_aux_loss" in [k for r in rows for k in r]


def test_task_losses_keep_the_router_losses():
    """A loss_fn of another task (fine-tuning, probes) passed to the train/eval step still gets the MoE part,
    and its router losses enter the objective: the step's loss parts and metrics show them."""
    from llmjax.objectives import losses

    def task_loss(model, batch, *, label_smoothing=0.0, z_loss=0.0, deterministic=True):
        logits = model(batch["inputs"], batch["segment_ids"], batch["positions"], deterministic=deterministic)
        sums = losses.cross_entropy(logits[:, -3], batch["targets"][:, -3])  # "classify" from one position
        return sums.loss, {"task": sums}

    weights = lambda b: {"task": jnp.asarray(b["inputs"].shape[0], jnp.float32)}
    mesh = shd.make_mesh(shd.mesh_config(data=1), jax.devices()[:1])
    rules = shd.rules_dict(shd.DEFAULT_RULES)
    for cfg, has_moe in ((moe_cfg(), True), (moe_cfg(num_experts=0, experts_per_token=1), False)):
        c = default_optim_config()
        tx = make_optimizer(c, total_steps=4)
        graphdef, state, state_sh = init_state(cfg, tx, mesh, rules, seed=0)
        b = _batches(1)[0]
        batch_sh = batch_shardings(mesh, b)
        step = make_train_step(graphdef, tx, state_sh, batch_sh, loss_fn=task_loss, weights_fn=weights)
        evaluate = make_eval_step(graphdef, state_sh, batch_sh, loss_fn=task_loss)
        sums = evaluate(state, global_batch(b, mesh))
        _, metrics = step(state, global_batch(b, mesh))
        assert ("moe" in sums) == has_moe and "task_loss" in metrics
        assert ("moe_aux_loss" in metrics) == has_moe
        if has_moe:
            assert np.isfinite(float(metrics["moe_aux_loss"])) and float(metrics["moe_aux_loss"]) > 0
