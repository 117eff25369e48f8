"""Hugging Face transformers <-> llmjax: `from_hf` imports a transformers model, `to_hf` exports one back.

Each family module (gpt2, bert, t5, llama) describes its weights as a list of `Rule`s pairing llmjax
parameter paths ("decoder/layers/0/self_attn/q/kernel") with HF state-dict names; the same rules drive
both directions, so an export followed by an import is exact. torch and transformers are imported only
inside the functions that touch HF objects: they are optional (test) dependencies.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax import params as params_lib
from llmjax.models.config import ConfigError, ModelConfig
from llmjax.models.transformer import build_model
from llmjax.params import flatten, listing, unflatten


class InteropError(ValueError):
    """An HF model, config or state dict that llmjax cannot represent (or vice versa). Names what and why."""


# model_type -> (family module, the one HF class it imports from / exports to)
ARCHITECTURES = {
    "gpt2": ("llmjax.interop.gpt2", "GPT2LMHeadModel"),
    "bert": ("llmjax.interop.bert", "BertForPreTraining"),
    "t5": ("llmjax.interop.t5", "T5ForConditionalGeneration"),
    "llama": ("llmjax.interop.llama", "LlamaForCausalLM"),
    "mixtral": ("llmjax.interop.mixtral", "MixtralForCausalLM"),
}


# --------------------------------------------------------------------------------------------- rules
@dataclasses.dataclass(frozen=True)
class Rule:
    """llmjax arrays `ours` <-> HF tensors `hf`. `to_ours(*hf arrays)` and `to_hf(*our arrays)` return tuples
    and must be exact inverses. With `copies`, the HF names are tied copies of one tensor (one llmjax array):
    on import any present subset is accepted and must agree; on export every name receives the array."""

    ours: tuple[str, ...]
    hf: tuple[str, ...]
    to_ours: Callable[..., tuple]
    to_hf: Callable[..., tuple]
    copies: bool = False


def _identity(*xs):
    return xs


def same(ours: str, hf: str) -> Rule:
    """A tensor stored identically on both sides (embedding tables, norm scales and biases)."""
    return Rule((ours,), (hf,), _identity, _identity)


def tied(ours: str, *hf: str) -> Rule:
    """One llmjax array stored under several (tied) HF names, all in the same layout."""
    return Rule((ours,), tuple(hf), _identity, _identity, copies=True)


def _shape(x: int | Sequence[int]) -> tuple[int, ...]:
    return (x,) if isinstance(x, int) else tuple(x)


def linear(ours: str, hf: str, in_shape, out_shape, *, bias: bool, conv1d: bool = False) -> list[Rule]:
    """An llmjax Linear at path `ours` (kernel [*in_shape, *out_shape]) <-> the HF layer `hf`: a torch
    nn.Linear (weight [out, in]) or, with `conv1d`, a GPT-2 Conv1D (weight [in, out])."""
    ins, outs = _shape(in_shape), _shape(out_shape)
    n_in, n_out = math.prod(ins), math.prod(outs)
    if conv1d:
        to_ours = lambda w: (w.reshape(ins + outs),)
        to_hf = lambda k: (k.reshape(n_in, n_out),)
    else:
        to_ours = lambda w: (w.T.reshape(ins + outs),)
        to_hf = lambda k: (k.reshape(n_in, n_out).T,)
    rules = [Rule((f"{ours}/kernel",), (f"{hf}.weight",), to_ours, to_hf)]
    if bias:
        rules.append(Rule((f"{ours}/bias",), (f"{hf}.bias",), lambda b: (b.reshape(outs),),
                          lambda b: (b.reshape(n_out),)))
    return rules


def norm(ours: str, hf: str, *, bias: bool) -> list[Rule]:
    """A LayerNorm / RMSNorm: scale <-> weight (+ bias)."""
    rules = [same(f"{ours}/scale", f"{hf}.weight")]
    if bias:
        rules.append(same(f"{ours}/bias", f"{hf}.bias"))
    return rules


# ------------------------------------------------------------------------------------ nested dicts
def import_params(rules: list[Rule], state_dict: dict[str, np.ndarray], *, ignore: Sequence[str] = (),
                  what: str = "HF model") -> dict:
    """HF state dict -> nested llmjax params. Every HF tensor must be used (or match an `ignore` regex)."""
    flat, used, missing = {}, set(), []
    for r in rules:
        if r.copies:
            present = [n for n in r.hf if n in state_dict]
            if not present:
                missing.append(r.hf[0])
                continue
            first = np.asarray(state_dict[present[0]])
            for n in present[1:]:
                if not np.array_equal(np.asarray(state_dict[n]), first):
                    raise InteropError(
                        f"{what}: {n} differs from {present[0]}, but the llmjax config ties them (one array); "
                        "the HF weights are untied: import with tie_embeddings=False"
                    )
            arrays = (first,)
        else:
            absent = [n for n in r.hf if n not in state_dict]
            if absent:
                missing.extend(absent)
                continue
            arrays = tuple(np.asarray(state_dict[n]) for n in r.hf)
        flat.update(zip(r.ours, r.to_ours(*arrays)))
        used.update(r.hf)
    unexpected = [k for k in state_dict if k not in used and not any(re.fullmatch(p, k) for p in ignore)]
    if missing or unexpected:
        msg = [f"{what}: the state dict does not match the llmjax config"]
        if missing:
            msg.append(f"missing: {listing(missing)}")
        if unexpected:
            msg.append(f"unexpected (weights llmjax has no place for): {listing(unexpected)}")
        raise InteropError("; ".join(msg))
    return unflatten(flat)


def export_params(rules: list[Rule], params: dict, *, what: str = "HF model") -> dict[str, np.ndarray]:
    """Nested llmjax params -> HF state dict (numpy, contiguous). Every llmjax array must have a place."""
    flat = flatten(params)
    out, used = {}, set()
    for r in rules:
        absent = [k for k in r.ours if k not in flat]
        if absent:
            raise InteropError(f"{what}: llmjax parameters {listing(absent)} are missing from the given state")
        arrays = r.to_hf(*(np.asarray(flat[k]) for k in r.ours))
        if r.copies:
            arrays = arrays * len(r.hf)
        out.update((n, np.ascontiguousarray(a)) for n, a in zip(r.hf, arrays))
        used.update(r.ours)
    extra = set(flat) - used
    if extra:
        raise InteropError(f"{what} has no place for the llmjax parameters {listing(extra)}; "
                           "remove those heads (e.g. num_labels/num_tags) before exporting")
    return out


# ------------------------------------------------------------------------------------- llmjax side
_BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def model_params(model_or_state, cfg: ModelConfig | None = None) -> dict:
    """Nested numpy params of a model, an nnx.State or a pure dict, with LoRA adapters merged into their
    base kernels (kernel + alpha/rank * A B), which is what an exported model must compute."""
    if isinstance(model_or_state, nnx.Module):
        cfg = cfg or model_or_state.cfg
        tree = nnx.state(model_or_state, nnx.Param).to_pure_dict()
    elif isinstance(model_or_state, nnx.State):
        tree = model_or_state.to_pure_dict()
    else:
        tree = model_or_state
    flat = {k: np.asarray(v) for k, v in params_lib.unstack_layers(flatten(tree)).items()}  # HF names per layer
    for key in [k for k in flat if k.endswith("/lora_a")]:
        base = key[: -len("lora_a")]
        a, b = flat.pop(key), flat.pop(base + "lora_b")
        if cfg is None or not cfg.lora_rank:
            raise InteropError("merging LoRA adapters needs the ModelConfig (lora_rank, lora_alpha); pass cfg")
        k = flat[base + "kernel"]
        delta = (a.astype(np.float32) @ b.astype(np.float32)) * (cfg.lora_alpha / cfg.lora_rank)
        flat[base + "kernel"] = (k.astype(np.float32) + delta.reshape(k.shape)).astype(k.dtype)
    return unflatten(flat)


def _checked(expected: dict, params: dict) -> dict:
    """Nested `params` fitted to the flat `expected` (params.fitted), mismatches as InteropError."""
    try:
        return params_lib.fitted(expected, flatten(params))
    except params_lib.ParamsMismatch as e:
        raise InteropError(str(e)) from None


def load_params(model: nnx.Module, params: dict) -> None:
    """Write nested `params` into every (non-LoRA) nnx.Param of an existing `model`: the set of paths and
    every shape must match exactly. Values are cast to each parameter's dtype and keep its sharding."""
    state = nnx.state(model, _BASE_PARAMS)
    expected = flatten(state.to_pure_dict())
    values = _checked(expected, params)

    def put(old, new):
        sharding = getattr(old, "sharding", None)
        return jax.device_put(new, sharding) if sharding is not None else jnp.asarray(new)

    nnx.replace_by_pure_dict(state, unflatten({k: put(expected[k], v) for k, v in values.items()}))
    nnx.update(model, state)


def build_with_params(cfg: ModelConfig, params: dict, seed: int = 0) -> nnx.Module:
    """build_model(cfg, seed) with `params` (nested, every non-LoRA weight, shapes checked) as its weights;
    LoRA adapters and RNG streams as build_model makes them (llmjax.params.build_with_params)."""
    abstract = nnx.state(nnx.eval_shape(lambda: build_model(cfg, seed)), _BASE_PARAMS)
    return params_lib.build_with_params(cfg, _checked(flatten(abstract.to_pure_dict()), params), seed)


# HF activation names -> llmjax elementwise activation, and back (gelu_new is the tanh approximation).
HF_ACTIVATIONS = {
    "gelu": "gelu", "gelu_python": "gelu",
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",  # the tanh formula with sqrt(2/pi) rounded to 10 digits
    "relu": "relu", "silu": "silu", "swish": "silu",
}
TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
GATED = {"relu": "reglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh", "silu": "swiglu"}
UNGATED = {v: k for k, v in GATED.items()}


def activation_from_hf(what: str, field: str, name: str, *, gated: bool) -> str:
    """The llmjax activation for HF activation `name` (gated: act(x W0) * x W1)."""
    check(name in HF_ACTIVATIONS, what, field, name, f"llmjax supports {', '.join(sorted(HF_ACTIVATIONS))}")
    act = HF_ACTIVATIONS[name]
    return GATED[act] if gated else act


def check(ok: bool, what: str, field: str, value, why: str) -> None:
    """Raise InteropError naming `field`=value of `what` when a setting cannot be represented."""
    if not ok:
        raise InteropError(f"{what}: unsupported {field}={value!r}; {why}")


def build_config(what: str, **fields) -> ModelConfig:
    """ModelConfig(**fields), with validation errors reported as interop errors naming the source."""
    try:
        return ModelConfig(**fields)
    except (ConfigError, TypeError) as e:
        raise InteropError(f"{what}: cannot build an llmjax config: {e}") from e


# ----------------------------------------------------------------------------------------- HF side
def _family(model_type: str):
    if model_type not in ARCHITECTURES:
        raise InteropError(f"unsupported Hugging Face model_type {model_type!r}; llmjax imports "
                           + ", ".join(f"{cls} ({t})" for t, (_, cls) in ARCHITECTURES.items()))
    module, cls = ARCHITECTURES[model_type]
    return importlib.import_module(module), cls


def state_dict_numpy(hf_model) -> dict[str, np.ndarray]:
    """The HF model's state dict as float32 numpy arrays (bf16/fp16 upcast; tied names all present)."""
    out = {}
    for k, v in hf_model.state_dict().items():
        v = v.detach().cpu()
        out[k] = (v.float() if v.is_floating_point() else v).numpy()
    return out


def embeddings_tied(hf_model) -> bool:
    """True when the HF output projection shares its weight tensor with the input embedding."""
    out, inp = hf_model.get_output_embeddings(), hf_model.get_input_embeddings()
    if out is None:
        return False
    return out.weight is inp.weight or out.weight.data_ptr() == inp.weight.data_ptr()


def from_hf(hf_model, *, seed: int = 0, **overrides) -> tuple[ModelConfig, nnx.Module]:
    """A transformers model -> (ModelConfig, llmjax model with its weights).

    `overrides` set llmjax-only fields (attention_kernel, dtype, param_dtype, lora_rank, ...) or replace
    mapped ones (e.g. attention_dropout_rate=0.0 for the 'dot_product' kernel)."""
    model_type = getattr(hf_model.config, "model_type", None)
    family, cls = _family(model_type)
    if type(hf_model).__name__ != cls:
        raise InteropError(f"unsupported Hugging Face class {type(hf_model).__name__}: for model_type "
                           f"{model_type!r} llmjax imports {cls} (the pretraining model with its heads)")
    cfg = family.config_from_hf(hf_model.config, tied=embeddings_tied(hf_model), **overrides)
    return cfg, build_with_params(cfg, family.params_from_hf(state_dict_numpy(hf_model), cfg), seed)


def architecture_of(cfg: ModelConfig) -> str:
    """The HF model_type an llmjax config exports to."""
    if cfg.family == "encoder":
        return "bert"
    if cfg.family == "encoder_decoder":
        return "t5"
    if cfg.position == "learned":
        return "gpt2"
    if cfg.position == "rope":
        return "mixtral" if cfg.num_experts else "llama"
    raise InteropError(f"no Hugging Face architecture for a decoder with position={cfg.position!r}; "
                       "GPT-2 needs 'learned', Llama needs 'rope'")


def to_hf(model: nnx.Module, *, arch: str | None = None, **config_kwargs):
    """An llmjax model -> the transformers model (GPT2LMHeadModel, BertForPreTraining,
    T5ForConditionalGeneration, LlamaForCausalLM or MixtralForCausalLM) with the same weights, loaded strictly.

    `arch` forces a model_type; `config_kwargs` go to the HF config (e.g. attn_implementation='eager',
    bos_token_id=...)."""
    import torch  # optional (the test extra): only the functions that touch HF objects import it

    cfg = model.cfg
    family, _ = _family(arch or architecture_of(cfg))
    hf_config = family.hf_config_from(cfg, **config_kwargs)
    hf_model = family.new_hf_model(hf_config, cfg)
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in family.params_to_hf(model, cfg).items()}
    hf_model.load_state_dict(state, strict=True)
    return hf_model.eval()


def build_hf_model(class_name: str, hf_config):
    """An HF model of `class_name` built (randomly initialised) from `hf_config`, in float32."""
    import transformers  # optional, as torch

    return getattr(transformers, class_name)(hf_config)
