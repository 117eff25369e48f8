"""Model presets (llmjax.presets): the facts that make each style what it is, the errors for unknown names, and
every config file under configs/ loading into a valid model. No training: config building only."""

import pathlib

import pytest

from llmjax import presets
from llmjax.config import base_config, load_config
from llmjax.models.config import ConfigError, ModelConfig
from llmjax.presets import model_preset

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG_FILES = sorted((ROOT / "configs").rglob("*.py"))


def preset_config(style, size, **overrides) -> ModelConfig:
    return ModelConfig.from_dict(model_preset(style, size, **overrides))


def test_t5_styles_use_relative_positions_rmsnorm_and_no_bias():
    for style, size in (("t5", "base"), ("t5_v1_1", "tiny")):
        cfg = preset_config(style, size)
        assert (cfg.family, cfg.position, cfg.norm, cfg.norm_eps) == ("encoder_decoder", "relative", "rmsnorm", 1e-6)
        assert not cfg.use_bias and not cfg.scale_attention
        assert (cfg.relative_buckets, cfg.relative_max_distance) == (32, 128)
    t5, v1_1 = preset_config("t5", "base"), preset_config("t5_v1_1", "tiny")
    assert (t5.activation, t5.tie_embeddings, t5.scale_tied_logits) == ("relu", True, True)
    assert (v1_1.activation, v1_1.tie_embeddings, v1_1.scale_tied_logits) == ("geglu_tanh", False, False)
    assert (t5.num_layers, t5.decoder_layers, t5.d_model, t5.head_size) == (12, 12, 768, 64)


def test_gpt2_and_bert_styles():
    gpt = preset_config("gpt2", "tiny")
    assert (gpt.family, gpt.norm, gpt.norm_position, gpt.activation, gpt.position) == (
        "decoder", "layernorm", "pre", "gelu_tanh", "learned")
    assert gpt.use_bias and gpt.tie_embeddings and gpt.scale_attention and gpt.norm_eps == 1e-5
    bert = preset_config("bert", "base")
    assert (bert.family, bert.norm_position, bert.norm_eps, bert.activation, bert.type_vocab_size) == (
        "encoder", "post", 1e-12, "gelu", 2)
    assert (bert.vocab_size, bert.num_layers, bert.d_model, bert.max_length) == (30522, 12, 768, 512)
    small = preset_config("gpt2", "small")
    assert (small.vocab_size, small.num_layers, small.d_model, small.num_heads, small.mlp_dim) == (
        50257, 12, 768, 12, 3072)


def test_llama_and_mixtral_styles():
    for style, size in (("llama", "1b"), ("llama", "7b"), ("mixtral", "tiny"), ("mixtral", "8x7b")):
        cfg = preset_config(style, size)
        assert (cfg.activation, cfg.norm, cfg.position, cfg.use_bias) == ("swiglu", "rmsnorm", "rope", False)
    one_b, seven_b = preset_config("llama", "1b"), preset_config("llama", "7b")
    assert (one_b.kv_heads, one_b.tie_embeddings, one_b.rope_theta, one_b.vocab_size) == (8, True, 500000.0, 128256)
    assert (seven_b.kv_heads, seven_b.tie_embeddings, seven_b.head_size, seven_b.mlp_dim) == (32, False, 128, 11008)
    assert seven_b.num_experts == 0
    mixtral = preset_config("mixtral", "8x7b")
    assert (mixtral.num_experts, mixtral.experts_per_token, mixtral.moe_capacity_factor, mixtral.kv_heads) == (
        8, 2, 0.0, 8)
    assert all(mixtral.is_moe_layer(i) for i in range(mixtral.num_layers))


def test_overrides_win_and_each_call_returns_a_new_dict():
    fields = model_preset("gpt2", "tiny", d_model=512, activation="gelu")
    assert (fields["d_model"], fields["activation"], fields["num_layers"]) == (512, "gelu", 4)
    fields["num_layers"] = 99
    assert model_preset("gpt2", "tiny")["num_layers"] == 4
    assert presets.SIZES["gpt2"]["tiny"]["d_model"] == 256


def test_unknown_style_or_size_names_the_choices():
    with pytest.raises(ConfigError, match=r"unknown style 'gpt3'; choose one of gpt2, bert, t5, t5_v1_1, llama, mixtral"):
        model_preset("gpt3", "tiny")
    with pytest.raises(ConfigError, match=r"unknown size 'tiny' for style 'llama'; choose one of 1b, 7b"):
        model_preset("llama", "tiny")


def test_bad_overrides_are_named():
    with pytest.raises(ConfigError, match=r"model\.d_modle"):
        model_preset("gpt2", "tiny", d_modle=512)
    with pytest.raises(ConfigError, match=r"model\.num_heads"):
        model_preset("gpt2", "tiny", d_model=250)


@pytest.mark.parametrize("style,size", [(st, si) for st in presets.STYLES for si in presets.SIZES[st]])
def test_every_preset_builds_a_config(style, size):
    cfg = base_config(objective="causal_lm" if style != "bert" else "mlm", **model_preset(style, size))
    assert ModelConfig.from_dict(cfg.model).d_model == presets.SIZES[style][size]["d_model"]


def test_every_style_has_a_size():
    assert set(presets.SIZES) == set(presets.STYLES)
    assert all(presets.SIZES[style] for style in presets.STYLES)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_file_loads_a_valid_model(path):
    if "def get_grid" in path.read_text():
        grid = load_config(path, function="get_grid")
        assert grid.cells
        for cell in grid.cells:
            ModelConfig.from_dict(dict(cell["model"]))
            base_config(objective=cell["objective"], **dict(cell["model"]))
    else:
        cfg = load_config(path)
        ModelConfig.from_dict(cfg.model)
