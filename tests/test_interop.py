"""Hugging Face interop: imported GPT-2, BERT, T5 (original and v1.1) and Llama (GQA) models reproduce the
transformers outputs on a right-padded batch; export -> import is exact; unsupported models fail clearly.

Tiny random HF models are built from configs (no download); every HF parameter is perturbed first, since
HF's init (norm scales 1, biases 0) would hide mapping mistakes. Non-default norm eps / rope theta / head_dim
make a config field that is mapped wrongly show up in the logits.
"""

import importlib
import jax
import numpy as np
import pytest

torch = importlib.import_module("torch")
transformers = importlib.import_module("transformers")

from flax import nnx  # noqa: E402

from llmjax.generate import generate  # noqa: E402
from llmjax.interop import InteropError, from_hf, load_params, to_hf  # noqa: E402
from llmjax.interop import bert, gpt2, hf, llama, t5  # noqa: E402
from llmjax.models.config import ModelConfig  # noqa: E402
from llmjax.models.transformer import build_model  # noqa: E402

TOL = 1e-4
V = 160
LENGTHS, DECODER_LENGTHS = (7, 5, 3), (6, 4, 2)  # right-padded rows of one batch
FAMILIES = {"gpt2": gpt2, "bert": bert, "t5": t5, "t5_v1_1": t5, "llama": llama}


# ------------------------------------------------------------------------------------------ HF models
def _perturbed(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # each tied tensor once, so tied weights stay tied
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _hf_model(case: str):
    torch.manual_seed(0)
    eager = dict(attn_implementation="eager")
    if case == "gpt2":
        c = transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                    layer_norm_epsilon=1e-3, bos_token_id=None, eos_token_id=None, **eager)
        model = transformers.GPT2LMHeadModel(c)
    elif case == "bert":
        c = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, max_position_embeddings=16, layer_norm_eps=1e-3, **eager)
        model = transformers.BertForPreTraining(c)
    elif case in ("t5", "t5_v1_1"):
        v11 = case == "t5_v1_1"
        # d_kv * num_heads != d_model, so head_dim must be mapped; more decoder than encoder layers.
        c = transformers.T5Config(vocab_size=V, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=3,
                                  num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=12,
                                  layer_norm_epsilon=1e-3, feed_forward_proj="gated-gelu" if v11 else "relu",
                                  tie_word_embeddings=not v11, **eager)
        model = transformers.T5ForConditionalGeneration(c)
        if v11:  # what from_pretrained makes of a v1.1 checkpoint: lm_head is its own tensor
            model.lm_head.weight = torch.nn.Parameter(0.2 * torch.randn(V, 32))
            model.all_tied_weights_keys.pop("lm_head.weight", None)
    elif case == "llama":
        c = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-3,
                                     rope_parameters={"rope_type": "default", "rope_theta": 100.0}, **eager)
        model = transformers.LlamaForCausalLM(c)
    else:
        raise ValueError(case)
    return _perturbed(model, seed=1)


def _batch(case: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)

    def padded(lengths):
        mask = (np.arange(max(lengths))[None] < np.array(lengths)[:, None]).astype(np.int64)
        return np.where(mask == 1, rng.integers(1, V, mask.shape), 0), mask

    ids, mask = padded(LENGTHS)
    batch = {"input_ids": ids, "attention_mask": mask}
    if case == "bert":
        batch["token_type_ids"] = (np.arange(ids.shape[1])[None] >= 2).astype(np.int64) * mask  # segments A, B
    if case.startswith("t5"):
        batch["decoder_input_ids"], batch["decoder_attention_mask"] = padded(DECODER_LENGTHS)
    return batch


def _hf_outputs(case, model, batch):
    """name -> (HF output, mask of the positions to compare)."""
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in batch.items()})
    if case == "bert":
        return {"mlm": (out.prediction_logits.numpy(), batch["attention_mask"]),
                "nsp": (out.seq_relationship_logits.numpy(), np.ones((len(LENGTHS), 2)))}
    mask = batch["decoder_attention_mask"] if case.startswith("t5") else batch["attention_mask"]
    return {"logits": (out.logits.numpy(), mask)}


# --------------------------------------------------------------------------------------- llmjax side
@nnx.jit
def _decoder(model, tokens, segment_ids):
    return model(tokens, segment_ids)


@nnx.jit
def _encoder(model, tokens, segment_ids, token_type_ids):
    out = model(tokens, segment_ids, token_type_ids=token_type_ids)
    return {"mlm": out["mlm_logits"], "nsp": out["nsp_logits"]}


@nnx.jit
def _encoder_decoder(model, tokens, decoder_tokens, segment_ids, decoder_segment_ids):
    return model(tokens, decoder_tokens, encoder_segment_ids=segment_ids, decoder_segment_ids=decoder_segment_ids)


def _our_outputs(case, model, batch) -> dict[str, np.ndarray]:
    ids, seg = batch["input_ids"], batch["attention_mask"]  # HF attention mask = segment ids (1 real, 0 pad)
    if case == "bert":
        return {k: np.asarray(v) for k, v in _encoder(model, ids, seg, batch["token_type_ids"]).items()}
    if case.startswith("t5"):
        out = _encoder_decoder(model, ids, batch["decoder_input_ids"], seg, batch["decoder_attention_mask"])
        return {"logits": np.asarray(out)}
    return {"logits": np.asarray(_decoder(model, ids, seg))}


def _max_diffs(case, model, hf_model, batch) -> dict[str, float]:
    ours = _our_outputs(case, model, batch)
    diffs = {}
    for name, (ref, mask) in _hf_outputs(case, hf_model, batch).items():
        assert ours[name].shape == ref.shape, name
        diffs[name] = float(np.abs(ours[name] - ref)[mask.astype(bool)].max())
    return diffs


def _flat_params(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in hf.flatten(nnx.state(model, nnx.Param).to_pure_dict()).items()}


EXPECTED_CONFIG = {
    "gpt2": dict(family="decoder", activation="gelu_tanh", position="learned", norm_eps=1e-3, tie_embeddings=True),
    "bert": dict(family="encoder", activation="gelu", norm_position="post", type_vocab_size=2, tie_embeddings=True),
    "t5": dict(family="encoder_decoder", activation="relu", norm="rmsnorm", head_dim=16, num_decoder_layers=3,
               scale_attention=False, tie_embeddings=True, scale_tied_logits=True, relative_buckets=8),
    "t5_v1_1": dict(activation="geglu_tanh", tie_embeddings=False, scale_tied_logits=False, use_bias=False),
    "llama": dict(activation="swiglu", num_kv_heads=2, rope_theta=100.0, norm_eps=1e-3, tie_embeddings=False),
}


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", list(FAMILIES))
def test_import_matches_transformers(case):
    hf_model, batch = _hf_model(case), _batch(case)
    cfg, model = from_hf(hf_model)
    for field, value in EXPECTED_CONFIG[case].items():
        assert getattr(cfg, field) == value, field
    diffs = _max_diffs(case, model, hf_model, batch)
    print(case, diffs)
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("case", list(FAMILIES))
def test_export_round_trip(case):
    hf_model, batch = _hf_model(case), _batch(case)
    cfg, model = from_hf(hf_model)
    exported = to_hf(model, attn_implementation="eager")
    assert type(exported) is type(hf_model)
    assert hf.embeddings_tied(exported) == hf.embeddings_tied(hf_model)
    original, back = hf_model.state_dict(), exported.state_dict()
    assert list(back) == list(original)  # the same names, strictly loaded
    for name in original:
        assert torch.equal(back[name], original[name]), name
    for name, (ref, mask) in _hf_outputs(case, hf_model, batch).items():
        again, _ = _hf_outputs(case, exported, batch)[name]
        np.testing.assert_array_equal(again, ref, err_msg=name)

    cfg2, model2 = from_hf(exported)
    assert cfg2 == cfg
    before, after = _flat_params(model), _flat_params(model2)
    assert list(after) == list(before)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    # The low-level path: state dict -> params -> an existing model.
    family = FAMILIES[case]
    load_params(model2, family.params_from_hf(hf.state_dict_numpy(exported), cfg))
    for name, value in _flat_params(model2).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


@pytest.mark.parametrize("kernel", ["blockwise", "dot_product"])
@pytest.mark.parametrize("case", ["t5", "llama"])  # relative-position bias (per tile when blockwise); GQA
def test_attention_kernels_match_transformers(case, kernel):
    hf_model, batch = _hf_model(case), _batch(case)
    # Blocks of 4 over lengths 6-7: several key blocks per row, and block padding.
    cfg, model = from_hf(hf_model, attention_kernel=kernel, attention_block_size=4, attention_dropout_rate=0.0)
    diffs = _max_diffs(case, model, hf_model, batch)
    print(case, kernel, diffs)
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("case", ["gpt2", "llama"])  # learned positions and a tied output embedding; RoPE and GQA
def test_greedy_decoding_matches_transformers_generate(case):
    """llmjax.generate's greedy tokens equal transformers' `generate` on the same two prompts (no EOS)."""
    hf_model, n, prompts = _hf_model(case), 8, np.random.default_rng(0).integers(1, V, (2, 5))
    hf_model.generation_config.eos_token_id, hf_model.generation_config.pad_token_id = None, 0
    with torch.no_grad():
        ids = torch.as_tensor(prompts)
        want = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    _, model = from_hf(hf_model)
    got = generate(model, prompts.tolist(), max_new_tokens=n, eos_id=-1)
    np.testing.assert_array_equal(got.sequences, want[:, prompts.shape[1]:].numpy())


def test_lora_adapters_are_merged_on_export():
    hf_model, batch = _hf_model("gpt2"), _batch("gpt2")
    cfg, model = from_hf(hf_model, lora_rank=2, lora_targets=("q", "v", "mlp"))
    rng = np.random.default_rng(3)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.LoRAParam) and path[-1] == "lora_b":
            var[...] = 0.3 * rng.standard_normal(var.shape).astype(np.float32)
    exported = to_hf(model, attn_implementation="eager")
    merged = np.asarray(model.decoder.layers[0].mlp.wi.merged_kernel())
    np.testing.assert_allclose(exported.transformer.h[0].mlp.c_fc.weight.detach().numpy(), merged, atol=1e-6)
    diffs = _max_diffs("gpt2", model, exported, batch)
    assert max(diffs.values()) <= TOL, diffs
    assert max(_max_diffs("gpt2", model, hf_model, batch).values()) > 1e-2  # the adapters did change the model


def _abstract(**fields):
    """A model whose weights are never computed: enough for export checks that fail on the config."""
    return nnx.eval_shape(lambda: build_model(ModelConfig(**fields), 0))


def test_unsupported_models_fail_clearly():
    tiny = dict(vocab_size=V, n_positions=16, n_embd=32, n_layer=1, n_head=4, bos_token_id=None, eos_token_id=None)
    with pytest.raises(InteropError, match="GPT2Model.*GPT2LMHeadModel"):
        from_hf(transformers.GPT2Model(transformers.GPT2Config(**tiny)))
    with pytest.raises(InteropError, match="add_cross_attention"):
        from_hf(transformers.GPT2LMHeadModel(transformers.GPT2Config(add_cross_attention=True, **tiny)))
    with pytest.raises(InteropError, match="model_type 'mistral'.*LlamaForCausalLM"):
        from_hf(transformers.MistralForCausalLM(transformers.MistralConfig(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2)))
    scaled = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                              "rope_theta": 10000.0})
    with pytest.raises(InteropError, match="rope_type='linear'"):
        from_hf(transformers.LlamaForCausalLM(scaled))
    mixed_bias = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, attention_bias=True, mlp_bias=False)
    with pytest.raises(InteropError, match="attention_bias/mlp_bias"):
        llama.config_from_hf(mixed_bias)
    # Untied HF weights forced into a tied llmjax config: named, not silently averaged or dropped.
    with pytest.raises(InteropError, match="lm_head.weight differs from shared.weight"):
        from_hf(_hf_model("t5_v1_1"), tie_embeddings=True)
    # Export: llmjax settings no HF architecture has.
    with pytest.raises(InteropError, match="position='sinusoidal'"):
        to_hf(_abstract(vocab_size=V, d_model=32, num_layers=1, num_heads=4, mlp_dim=64, position="sinusoidal"))
    with pytest.raises(InteropError, match="num_labels=3"):
        to_hf(_abstract(family="encoder", vocab_size=V, d_model=32, num_layers=1, num_heads=4, mlp_dim=64,
                        norm_position="post", type_vocab_size=2, num_labels=3))
    with pytest.raises(InteropError, match="GPT-2 export: unsupported num_kv_heads=2"):
        to_hf(_abstract(vocab_size=V, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=64))


def test_training_steps_match_transformers_with_torch_adamw(tmp_path):
    """Eight steps of llmjax's train step (AdamW; warm-up, then cosine decay; weight decay on matrices only;
    clipping by global norm, active here) from the same weights on the same packed-free batch give the losses
    of transformers' GPT2LMHeadModel trained with torch.optim.AdamW as the train-step benchmark's PyTorch peer
    (benchmarks/hf_train_step.py) sets it up. It checks that peer too: the benchmark compares like with like."""
    from benchmarks import hf_train_step  # the benchmark's peer, run in this process
    from llmjax import sharding as shd  # the train step's own pieces, as tests/test_train.py builds them
    from llmjax.state import default_optim_config, init_state, make_optimizer
    from llmjax.step import batch_shardings, global_batch, make_train_step

    hf_cfg = transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg = gpt2.config_from_hf(hf_cfg)
    steps = 8
    o = default_optim_config()
    o.update(learning_rate=1e-2, warmup_steps=2, clip_norm=0.5, weight_decay=0.1, schedule="cosine")
    mesh = shd.make_mesh(shd.mesh_config(data=1), jax.devices()[:1])
    tx = make_optimizer(o, total_steps=steps)
    graphdef, state, state_sh = init_state(cfg, tx, mesh, shd.rules_dict(shd.DEFAULT_RULES), seed=0)
    np.savez(tmp_path / "weights.npz", **gpt2.params_to_hf(state.params, cfg))

    tokens = np.random.default_rng(0).integers(0, V, (4, 16)).astype(np.int32)
    weights = np.ones(tokens.shape, np.float32)
    weights[:, -1] = 0  # HF shifts the labels: the last position has no target
    batch = {"inputs": tokens, "targets": np.roll(tokens, -1, axis=1), "weights": weights,
             "segment_ids": np.ones_like(tokens), "positions": np.broadcast_to(np.arange(16, dtype=np.int32),
                                                                                tokens.shape).copy()}
    np.savez(tmp_path / "batch.npz", input_ids=tokens.astype(np.int64), labels=tokens.astype(np.int64))
    torch_step, info = hf_train_step.build({
        "model_class": "GPT2LMHeadModel", "config_class": "GPT2Config", "hf_config": gpt2.hf_config_from(cfg).to_dict(),
        "untie_lm_head": False, "shifted_labels": True, "batch": str(tmp_path / "batch.npz"),
        "weights": str(tmp_path / "weights.npz"), "threads": torch.get_num_threads(), "seed": 0,
        "optim": hf_train_step.optim_setup(o, steps)})
    assert info["unloaded"] == [] and info["unused"] == []

    step = make_train_step(graphdef, tx, state_sh, batch_shardings(mesh, batch),
                           rules=shd.rules_dict(shd.DEFAULT_RULES))
    ours, theirs, norms = [], [], []
    for _ in range(steps):
        state, metrics = step(state, global_batch(batch, mesh))
        ours.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
        theirs.append(torch_step()[1])
    assert max(norms) > o.clip_norm  # clipping is exercised
    assert ours[-1] < ours[0] - 0.5  # it learns: the later losses depend on every update so far
    np.testing.assert_allclose(ours, theirs, rtol=2e-5)
