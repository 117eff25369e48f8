"""Model invariants: configs, parameter counts, causality, packing isolation, GQA, KV cache, LoRA, errors, dtypes."""

import functools
import glob
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llmjax.config import load_config, model_config
from llmjax.models.config import ConfigError, ModelConfig
from llmjax.models.layers import count_params
from llmjax.models.transformer import build_model

CONFIGS = sorted(glob.glob(str(pathlib.Path(__file__).parent.parent / "configs" / "*.py")))
V = 97

TINY = {
    # family, extra fields: the positional schemes and norms of the three classic families
    "gpt": dict(family="decoder", activation="gelu_tanh", position="learned"),
    "llama": dict(family="decoder", activation="swiglu", norm="rmsnorm", use_bias=False, position="rope",
                  num_kv_heads=2, tie_embeddings=False),
    "bert": dict(family="encoder", activation="gelu", norm_position="post", type_vocab_size=2),
    "t5": dict(family="encoder_decoder", activation="geglu_tanh", norm="rmsnorm", use_bias=False,
               position="relative", scale_attention=False, relative_max_distance=16),
    "sinusoidal_decoder": dict(family="decoder", position="sinusoidal"),
}


def tiny(name, **kw):
    fields = dict(vocab_size=V, d_model=32, num_layers=2, num_heads=4, mlp_dim=48, max_length=64)
    fields.update(TINY[name])
    fields.update(kw)
    return ModelConfig(**fields)


@functools.lru_cache(maxsize=None)
def _cached_model(cfg, seed):
    return build_model(cfg, seed)


def model_for(cfg, seed=0):
    """Models are only read by these tests, so one instance per config is enough (init is slow eagerly)."""
    return _cached_model(cfg, seed)


@nnx.jit
def _run(model, tokens, seg, pos, dec_tokens, dec_seg, dec_pos):
    cfg = model.cfg
    if cfg.family == "decoder":
        return model(tokens, seg, pos)
    if cfg.family == "encoder":
        return model(tokens, seg, pos)["mlm_logits"]
    return model(tokens, dec_tokens, seg, dec_seg, pos, dec_pos)


def run(model, cfg, tokens, seg=None, pos=None, dec_tokens=None, dec_seg=None, dec_pos=None):
    """Main output of any family, jit-compiled: logits [B, T, V]."""
    return _run(model, tokens, seg, pos, dec_tokens, dec_seg, dec_pos)


# --------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: pathlib.Path(p).stem)
def test_every_config_loads_and_builds_abstractly(path):
    cfg = model_config(load_config(path))
    model = nnx.eval_shape(lambda: build_model(cfg, 0))
    assert count_params(nnx.state(model, nnx.Param)) > 0


@pytest.mark.parametrize("name,expected", [
    ("gpt2_small", 124_439_808),  # GPT-2 small as published by OpenAI / HF GPT2LMHeadModel
    ("bert_base", 110_106_428),  # BERT-base with MLM + NSP heads (BertForPreTraining)
    ("t5_base", 222_903_552),  # T5-base (T5ForConditionalGeneration)
    ("llama_1b", 1_235_814_400),  # Llama 3.2 1B
    ("llama_7b", 6_738_415_616),  # Llama 2 7B (LlamaForCausalLM)
])
def test_published_parameter_counts(name, expected):
    paper = {"gpt2_small": 124e6, "bert_base": 110e6, "t5_base": 223e6, "llama_1b": 1.24e9, "llama_7b": 6.74e9}[name]
    cfg = model_config(load_config(pathlib.Path(__file__).parent.parent / "configs" / f"{name}.py"))
    n = count_params(nnx.state(nnx.eval_shape(lambda: build_model(cfg, 0)), nnx.Param))
    assert n == expected
    assert abs(n - paper) / paper < 0.005


def test_every_param_has_logical_axes():
    for name in TINY:
        model = build_model(tiny(name, lora_rank=2, lora_targets=("q", "v", "mlp")), 0)
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            axes = var.get_metadata().get("logical_axes")
            assert axes is not None and len(axes) == var.value.ndim, (name, path)


# ------------------------------------------------------------------------------------------ invariants
@pytest.mark.parametrize("name", ["gpt", "llama", "t5", "sinusoidal_decoder"])
@pytest.mark.parametrize("kernel", ["reference", "blockwise"])
def test_causality(name, kernel):
    """Changing tokens after t never changes outputs at <= t."""
    cfg = tiny(name, attention_kernel=kernel, attention_block_size=4)
    model = model_for(cfg)
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.integers(7, V, (2, 12)))
    t = 5
    b = a.at[:, t + 1:].set(jnp.asarray(rng.integers(7, V, (2, 12 - t - 1))))
    enc = jnp.asarray(rng.integers(7, V, (2, 9)))
    if cfg.family == "encoder_decoder":
        out_a, out_b = run(model, cfg, enc, dec_tokens=a), run(model, cfg, enc, dec_tokens=b)
    else:
        out_a, out_b = run(model, cfg, a), run(model, cfg, b)
    np.testing.assert_allclose(out_a[:, : t + 1], out_b[:, : t + 1], atol=1e-5)
    assert not np.allclose(out_a[:, t + 1:], out_b[:, t + 1:], atol=1e-3)


def _pack(docs, length):
    tokens, seg, pos = np.zeros(length, np.int32), np.zeros(length, np.int32), np.zeros(length, np.int32)
    start = 0
    for i, d in enumerate(docs):
        tokens[start:start + len(d)], seg[start:start + len(d)] = d, i + 1
        pos[start:start + len(d)] = np.arange(len(d))
        start += len(d)
    return tokens[None], seg[None], pos[None]


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("kernel", ["reference", "dot_product", "blockwise"])
def test_packed_row_equals_sequences_run_alone(name, kernel):
    cfg = tiny(name, attention_kernel=kernel, attention_block_size=8)
    model = model_for(cfg)
    rng = np.random.default_rng(1)
    lens, dec_lens = [7, 11, 5], [4, 6, 3]
    docs = [rng.integers(7, V, n) for n in lens]
    dec_docs = [rng.integers(7, V, n) for n in dec_lens]
    tok, seg, pos = _pack(docs, 26)  # 3 padding tokens at the end
    dtok, dseg, dpos = _pack(dec_docs, 15)
    packed = run(model, cfg, jnp.asarray(tok), jnp.asarray(seg), jnp.asarray(pos), jnp.asarray(dtok),
                 jnp.asarray(dseg), jnp.asarray(dpos))
    # Each document alone in its own row (padded after it with segment 0), all rows in one call.
    rows = [_pack([d], 26) for d in docs]
    drows = [_pack([d], 15) for d in dec_docs]
    cat = lambda rs, i: jnp.asarray(np.concatenate([r[i] for r in rs]))
    alone = run(model, cfg, cat(rows, 0), cat(rows, 1), cat(rows, 2), cat(drows, 0), cat(drows, 1), cat(drows, 2))
    start, dstart = 0, 0
    for i, (d, dd) in enumerate(zip(docs, dec_docs)):
        if cfg.family == "encoder_decoder":
            got, want = packed[0, dstart:dstart + len(dd)], alone[i, :len(dd)]
        else:
            got, want = packed[0, start:start + len(d)], alone[i, :len(d)]
        np.testing.assert_allclose(got, want, atol=2e-5)
        start, dstart = start + len(d), dstart + len(dd)


def test_gqa_equals_mha_with_repeated_kv_heads():
    """A GQA model (8 query heads, 2 kv heads) equals the MHA model whose k/v heads repeat each kv head for
    its group of 4 query heads; with num_kv_heads == num_heads the same model is plain MHA."""
    gqa_cfg = tiny("llama", num_heads=8, num_kv_heads=2)
    mha_cfg = tiny("llama", num_heads=8, num_kv_heads=8)
    gqa, mha = build_model(gqa_cfg, 0), build_model(mha_cfg, 1)
    for lg, lm in zip(gqa.decoder.layers, mha.decoder.layers):
        for name in ("k", "v"):
            w = getattr(lg.self_attn, name).kernel[...]  # [D, K, H]
            getattr(lm.self_attn, name).kernel[...] = jnp.repeat(w, 4, axis=1)  # kv head j -> heads 4j..4j+3
    gqa_params = nnx.to_flat_state(nnx.state(gqa, nnx.Param))
    mha_state = nnx.state(mha, nnx.Param)
    for path, var in gqa_params:
        if path[-2] not in ("k", "v"):
            target = mha_state
            for p in path[:-1]:
                target = target[p]
            target[path[-1]].value = var.value
    nnx.update(mha, mha_state)
    tokens = jnp.asarray(np.random.default_rng(2).integers(7, V, (2, 10)))
    np.testing.assert_allclose(gqa(tokens), mha(tokens), atol=1e-5)
    assert mha_cfg.kv_heads == mha_cfg.num_heads == ModelConfig(num_heads=8, num_kv_heads=None).kv_heads


def test_relative_bias_is_owned_by_the_stack_once():
    model = build_model(tiny("t5"), 0)
    paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    rel = [p for p in paths if "relative_bias" in p]
    assert rel == ["decoder/relative_bias/embedding", "encoder/relative_bias/embedding"]
    assert model.encoder.relative_bias.bidirectional and not model.decoder.relative_bias.bidirectional


# ------------------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("name", ["gpt", "llama", "sinusoidal_decoder"])
@pytest.mark.parametrize("kernel", ["reference", "blockwise"])
def test_kv_cache_decoder_reproduces_full_forward(name, kernel):
    cfg = tiny(name, attention_kernel=kernel, attention_block_size=4)
    model = model_for(cfg)
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(7, V, (2, 14)))
    full = run(model, cfg, tokens)
    step = nnx.jit(lambda m, tok, pos, cache: m(tok, positions=pos, cache=cache))
    cache = model.init_cache(2, 16)
    prompt = 6
    logits, cache = step(model, tokens[:, :prompt], jnp.tile(jnp.arange(prompt), (2, 1)), cache)  # prefill
    steps = [logits]
    for t in range(prompt, 14):
        logits, cache = step(model, tokens[:, t:t + 1], jnp.full((2, 1), t, jnp.int32), cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5)
    assert int(cache[0].index) == 14


def test_kv_cache_prefix_lm_decoder():
    """A prefix-LM prompt (bidirectional prefix) decoded with the cache matches the full prefix-LM forward."""
    cfg = tiny("llama")
    model = model_for(cfg)
    tokens = jnp.asarray(np.random.default_rng(4).integers(7, V, (1, 12)))
    prefix = jnp.arange(12)[None] < 5
    full = model(tokens, prefix_mask=prefix)
    cache = model.init_cache(1, 12)
    logits, cache = model(tokens[:, :5], prefix_mask=prefix[:, :5], cache=cache)
    steps = [logits]
    step = nnx.jit(lambda m, tok, pos, cache: m(tok, positions=pos, cache=cache))
    for t in range(5, 12):
        logits, cache = step(model, tokens[:, t:t + 1], jnp.array([[t]]), cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5)
    # ... and the prefix really is bidirectional: it differs from the causal forward on the prefix.
    assert not np.allclose(model(tokens)[:, :4], full[:, :4], atol=1e-4)


@pytest.mark.parametrize("kernel", ["reference", "blockwise"])
def test_kv_cache_encoder_decoder_reproduces_full_forward(kernel):
    cfg = tiny("t5", attention_kernel=kernel, attention_block_size=4)
    model = model_for(cfg)
    rng = np.random.default_rng(5)
    enc = jnp.asarray(rng.integers(7, V, (2, 9)))
    enc_seg = jnp.asarray([[1] * 9, [1] * 6 + [0] * 3])  # second row padded
    dec = jnp.asarray(rng.integers(7, V, (2, 10)))
    full = run(model, cfg, enc, enc_seg, dec_tokens=dec)
    encoded = model.encode(enc, enc_seg)
    cache, cross = model.init_cache(2, 10, encoded, enc_seg)
    step = nnx.jit(lambda m, tok, pos, cache, cross: m.decode(tok, None, positions=pos, cache=cache,
                                                              cross_cache=cross))
    steps = []
    for t in range(10):
        logits, cache = step(model, dec[:, t:t + 1], jnp.full((2, 1), t), cache, cross)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5)


# ----------------------------------------------------------------------------------------------- LoRA
def test_lora_zero_b_equals_base_and_only_adapters_train():
    base_cfg = tiny("llama")
    lora_cfg = base_cfg.replace(lora_rank=4, lora_targets=("q", "k", "v", "o", "mlp"))
    base, lora = build_model(base_cfg, 0), build_model(lora_cfg, 0)
    tokens = jnp.asarray(np.random.default_rng(6).integers(7, V, (2, 10)))
    np.testing.assert_array_equal(base(tokens), lora(tokens))  # same seed, same base weights, B = 0

    base_params = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # LoRAParam is a kind of Param
    before = jax.tree.map(np.array, nnx.state(lora, base_params))
    optimizer = nnx.Optimizer(lora, optax.adam(1e-2), wrt=nnx.LoRAParam)

    def loss_fn(model):
        logits = model(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    # Even a gradient over every parameter gives exactly zero to the frozen base kernels.
    all_grads = nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param)))(lora)
    assert float(jnp.abs(all_grads["decoder"]["layers"][0]["self_attn"]["q"]["kernel"][...]).max()) == 0.0

    @nnx.jit
    def train_step(model, optimizer):
        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)

    for _ in range(3):
        train_step(lora, optimizer)
    after = nnx.state(lora, base_params)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, after))  # base bit-identical
    b = lora.decoder.layers[0].self_attn.q.lora_b[...]
    assert float(jnp.abs(b).max()) > 0  # the adapter did train
    assert not np.allclose(base(tokens), lora(tokens))
    # Merging the adapter into the base kernel reproduces the adapted layer.
    layer = lora.decoder.layers[0].self_attn.q
    x = jax.random.normal(jax.random.key(0), (3, base_cfg.d_model))
    merged = x @ layer.merged_kernel().reshape(base_cfg.d_model, -1)
    np.testing.assert_allclose(merged.reshape(layer(x).shape), layer(x), atol=1e-5)


# --------------------------------------------------------------------------------------- errors, dtypes
@pytest.mark.parametrize("fields,field_name", [
    (dict(num_heads=6, num_kv_heads=4), "model.num_kv_heads"),
    (dict(activation="gelu_fast"), "model.activation"),
    (dict(position="rope", d_model=30, num_heads=2), "model.head_dim"),
    (dict(family="gpt"), "model.family"),
    (dict(d_model=30, num_heads=4), "model.num_heads"),
    (dict(attention_kernel="dot_product", attention_dropout_rate=0.1), "model.attention_dropout_rate"),
    (dict(dtype="float8"), "model.dtype"),
    (dict(lora_targets=("query",)), "model.lora_targets"),
])
def test_invalid_config_names_the_field(fields, field_name):
    with pytest.raises(ConfigError, match=field_name.replace(".", r"\.")):
        ModelConfig(**fields)


def test_unknown_field_in_config_dict_is_named():
    with pytest.raises(ConfigError, match=r"model\.num_head\b"):
        ModelConfig.from_dict({"num_head": 4})


def test_bfloat16_compute_with_float32_params():
    cfg32 = tiny("llama")
    m32, m16 = build_model(cfg32, 0), build_model(cfg32.replace(dtype="bfloat16"), 0)
    tokens = jnp.asarray(np.random.default_rng(7).integers(7, V, (2, 10)))
    out16 = m16(tokens)
    assert out16.dtype == jnp.float32  # logits are returned in float32 for the loss
    assert all(v.value.dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(m16, nnx.Param)))
    np.testing.assert_allclose(out16, m32(tokens), atol=0.05)


def test_dropout_only_when_not_deterministic():
    cfg = tiny("gpt", dropout_rate=0.2, attention_dropout_rate=0.2)
    model = model_for(cfg)
    tokens = jnp.asarray(np.random.default_rng(8).integers(7, V, (2, 10)))
    np.testing.assert_array_equal(model(tokens), model(tokens))
    a, b = model(tokens, deterministic=False), model(tokens, deterministic=False)
    assert not np.allclose(a, b)  # fresh dropout masks each call


def test_bert_heads():
    cfg = tiny("bert", num_labels=3, num_tags=5)
    model = model_for(cfg)
    tokens = jnp.asarray(np.random.default_rng(9).integers(7, V, (2, 10)))
    out = model(tokens, token_type_ids=jnp.asarray([[0] * 5 + [1] * 5] * 2))
    assert out["mlm_logits"].shape == (2, 10, V) and out["nsp_logits"].shape == (2, 2)
    assert out["class_logits"].shape == (2, 3) and out["tag_logits"].shape == (2, 10, 5)
    out0 = model(tokens)
    assert not np.allclose(out["hidden"], out0["hidden"])  # token types matter


# ------------------------------------------------------------------------------- hand-written gradients
@pytest.mark.parametrize("center", [True, False])  # LayerNorm, RMSNorm
@pytest.mark.parametrize("with_bias", [True, False])
def test_normalize_value_and_gradients_match_autodiff(center, with_bias):
    from llmjax.models.layers import normalize

    rng = np.random.default_rng(20)
    x = jnp.asarray(rng.normal(size=(3, 5, 16)) * 3 + 1, jnp.float32)
    scale = jnp.asarray(rng.normal(size=16), jnp.float32)
    bias = jnp.asarray(rng.normal(size=16), jnp.float32) if with_bias else None
    w = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.float32)

    def plain(x, scale, bias):
        if center:
            x = x - x.mean(-1, keepdims=True)
        y = x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale
        return y if bias is None else y + bias

    argnums = (0, 1, 2) if with_bias else (0, 1)
    ours = jax.value_and_grad(lambda *a: jnp.sum(normalize(*a, 1e-6, center) * w), argnums)(x, scale, bias)
    want = jax.value_and_grad(lambda *a: jnp.sum(plain(*a) * w), argnums)(x, scale, bias)
    np.testing.assert_allclose(ours[0], want[0], rtol=1e-5)
    for a, b in zip(ours[1], want[1]):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_exact_gelu_and_its_gradient_match_torch():
    import torch

    from llmjax.models.layers import gelu_exact

    x = np.linspace(-10, 10, 40001).astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.gelu(tx)  # exact (erf) GELU
    ty.sum().backward()
    np.testing.assert_allclose(gelu_exact(jnp.asarray(x)), ty.detach().numpy(), atol=2e-6, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda a: gelu_exact(a).sum())(jnp.asarray(x)), tx.grad.numpy(),
                               atol=1e-6, rtol=1e-6)
