"""Mixtral (transformers MixtralForCausalLM) <-> llmjax DecoderOnly with a mixture of experts in every layer:
Llama attention and norms, a softmax top-k router (gate -> mlp/router, transposed) and SwiGLU experts stored
as 3-D tensors (experts.gate_up_proj [E, 2F, D] -> mlp/experts/wi_0 and wi_1 [E, D, F]; experts.down_proj
[E, D, F] -> mlp/experts/wo [E, F, D]). HF renormalises the top-k weights and drops no token: the import is
dropless with moe_renormalize=True."""

from __future__ import annotations

import numpy as np

from llmjax.interop import hf, llama
from llmjax.models.config import ModelConfig

MODEL_TYPE, HF_CLASS = "mixtral", "MixtralForCausalLM"
WHAT = "Mixtral"


def config_from_hf(c, *, tied: bool | None = None, **overrides) -> ModelConfig:
    """MixtralConfig -> ModelConfig. `tied` (lm_head shares embed_tokens) defaults to c.tie_word_embeddings."""
    hf.check(getattr(c, "sliding_window", None) is None, WHAT, "sliding_window", c.sliding_window,
             "llmjax attention has no sliding window; use sliding_window=None (Mixtral 8x7B has none)")
    fields = dict(
        llama.config_fields(c, WHAT, use_bias=False, tied=tied),
        num_experts=c.num_local_experts, experts_per_token=c.num_experts_per_tok, moe_every=1,
        moe_capacity_factor=0.0, moe_renormalize=True, moe_shared_expert=False,
        moe_aux_loss_weight=float(c.router_aux_loss_coef), moe_router_jitter=float(c.router_jitter_noise or 0.0),
    )
    return hf.build_config(WHAT, **{**fields, **overrides})


def hf_config_from(cfg: ModelConfig, **kwargs):
    """ModelConfig -> MixtralConfig; raises InteropError for anything Mixtral cannot express."""
    from transformers import MixtralConfig  # optional (the test extra)

    llama.check_exportable(cfg, WHAT, (
        (not cfg.use_bias, "use_bias", "Mixtral projections have no biases"),
        (cfg.num_experts > 0 and cfg.moe_every == 1, "moe_every", "every Mixtral layer is a mixture of experts"),
        (cfg.moe_renormalize, "moe_renormalize", "Mixtral renormalises the top-k gate weights"),
        (not cfg.moe_shared_expert, "moe_shared_expert", "Mixtral has no shared expert"),
        (cfg.expert_mlp_dim == cfg.mlp_dim, "moe_mlp_dim", "Mixtral's experts have intermediate_size"),
        (not cfg.moe_capacity_factor, "moe_capacity_factor", "Mixtral drops no token (dropless routing)"),
    ))
    fields = dict(
        llama.hf_fields(cfg), sliding_window=None, num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.experts_per_token, router_aux_loss_coef=cfg.moe_aux_loss_weight,
        router_jitter_noise=cfg.moe_router_jitter,
    )
    return MixtralConfig(**{**fields, **kwargs})


def new_hf_model(hf_config, cfg: ModelConfig):
    return hf.build_hf_model(HF_CLASS, hf_config)


def _experts(ours: str, theirs: str, f: int) -> list[hf.Rule]:
    to_ours = lambda gate_up: (gate_up[:, :f].transpose(0, 2, 1), gate_up[:, f:].transpose(0, 2, 1))
    to_hf = lambda wi_0, wi_1: (np.concatenate([wi_0, wi_1], axis=2).transpose(0, 2, 1),)
    return [
        hf.Rule((f"{ours}/wi_0/kernel", f"{ours}/wi_1/kernel"), (f"{theirs}.gate_up_proj",), to_ours, to_hf),
        hf.Rule((f"{ours}/wo/kernel",), (f"{theirs}.down_proj",), lambda w: (w.transpose(0, 2, 1),),
                lambda k: (k.transpose(0, 2, 1),)),
    ]


def rules(cfg: ModelConfig) -> list[hf.Rule]:
    """Llama's rules for embeddings, attention and norms; the dense MLP rules replaced by router + experts."""
    out = [r for r in llama.rules(cfg) if not any("/mlp/" in name for name in r.ours)]
    for i in range(cfg.num_layers):
        ours, theirs = f"decoder/layers/{i}/mlp", f"model.layers.{i}.mlp"
        out.append(hf.Rule((f"{ours}/router",), (f"{theirs}.gate.weight",), lambda w: (w.T,), lambda w: (w.T,)))
        out += _experts(f"{ours}/experts", f"{theirs}.experts", cfg.mlp_dim)
    return out


def params_from_hf(state_dict: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
    """MixtralForCausalLM state dict (HF names, numpy) -> nested params matching nnx.state(model, nnx.Param)."""
    return hf.import_params(rules(cfg), state_dict, ignore=llama.IGNORED, what=WHAT)


def params_to_hf(model_or_state, cfg: ModelConfig | None = None) -> dict[str, np.ndarray]:
    """llmjax model / state -> MixtralForCausalLM state dict (numpy, HF names; LoRA merged)."""
    cfg = cfg or model_or_state.cfg
    return hf.export_params(rules(cfg), hf.model_params(model_or_state, cfg), what=WHAT)
