"""ModelConfig: the one typed description of a transformer, validated with messages that name the field.

Config files keep the model section as an ml_collections ConfigDict (`model_config_dict`); the modules
receive a frozen, validated `ModelConfig` built from it (`ModelConfig.from_dict`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

FAMILIES = ("decoder", "encoder", "encoder_decoder")
# name -> (elementwise activation, gated). Gated MLPs compute act(x W_gate) * (x W_up).
ACTIVATIONS = {
    "relu": ("relu", False),
    "gelu": ("gelu", False),  # exact (erf) GELU, as BERT
    "gelu_tanh": ("gelu_tanh", False),  # tanh approximation, as GPT-2
    "silu": ("silu", False),
    "reglu": ("relu", True),
    "geglu": ("gelu", True),
    "geglu_tanh": ("gelu_tanh", True),  # T5 v1.1 "gated-gelu"
    "swiglu": ("silu", True),  # Llama
}
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
POSITIONS = ("learned", "sinusoidal", "rope", "relative", "none")
# 'auto': by platform at trace time (splash on TPU, dot_product/cuDNN on GPU, cpu_flash on CPU); 'splash': the
# Pallas TPU kernel, 'cpu_flash' the C++ CPU kernel (llmjax.kernels.cpu_attention), each falling back to
# 'reference' for the attentions it does not cover (bias, prefix LM, cache; cpu_flash: also non-causal).
KERNELS = ("auto", "reference", "dot_product", "blockwise", "splash", "cpu_flash")
# Rematerialisation of each block in the backward pass: keep nothing, or keep only matmul outputs.
REMAT_POLICIES = ("none", "full", "save_dots")
DTYPES = ("float32", "bfloat16", "float16")
LORA_TARGETS = ("q", "k", "v", "o", "mlp")


class ConfigError(ValueError):
    """A configuration that cannot work. The message names the field and how to fix it."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every shape and switch of a model. Letters used in shape comments: B batch, T query length,
    S key length, D d_model, N heads, K kv heads, H head_dim, F mlp_dim, V vocab."""

    family: str = "decoder"
    vocab_size: int = 32000
    d_model: int = 512
    num_layers: int = 6  # decoder layers (decoder), encoder layers (encoder, encoder_decoder)
    num_decoder_layers: int | None = None  # encoder_decoder only; None = num_layers
    num_heads: int = 8
    num_kv_heads: int | None = None  # None = num_heads (MHA); 1 = MQA; else GQA
    head_dim: int | None = None  # None = d_model // num_heads
    mlp_dim: int = 2048
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"  # pre: x + f(norm(x)), final norm; post: norm(x + f(x)), embedding norm
    use_bias: bool = True  # biases in the attention and MLP projections
    norm_bias: bool = True  # LayerNorm offset (RMSNorm never has one)
    position: str = "learned"
    max_length: int = 1024  # size of the learned / sinusoidal position table
    rope_theta: float = 10000.0
    relative_buckets: int = 32
    relative_max_distance: int = 128
    type_vocab_size: int = 0  # token-type (BERT segment A/B) embeddings; 0 = none
    scale_attention: bool = True  # q.k / sqrt(head_dim); T5 folds the scale into its init instead
    tie_embeddings: bool = True
    scale_tied_logits: bool = False  # T5: multiply the decoder output by d_model**-0.5 when tied
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    attention_kernel: str = "auto"  # see KERNELS
    attention_block_size: int = 512  # key/query block of the blockwise kernel
    remat: str = "none"  # none | full | save_dots (recompute each block in the backward pass)
    scan_layers: bool = False  # block parameters stacked on a leading 'layers' axis, run by jax.lax.scan
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    # Encoder-only heads (BERT).
    pooler: bool = True  # tanh(W h_[CLS]) feeding NSP / sequence classification
    num_labels: int = 0  # sequence-classification head; 0 = none
    num_tags: int = 0  # token-classification head; 0 = none
    # LoRA adapters on the named projections; rank 0 = no adapters.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q", "v")
    # Mixture of experts (llmjax.models.moe) in place of the MLP; num_experts 0 = dense MLPs everywhere.
    num_experts: int = 0
    experts_per_token: int = 2  # top-k: 1 = Switch Transformer, 2 = Mixtral
    moe_every: int = 1  # layer i (from 0) is an MoE layer when (i + 1) % moe_every == 0; 1 = every layer
    moe_mlp_dim: int | None = None  # hidden size of each expert (and the shared expert); None = mlp_dim
    moe_capacity_factor: float | None = 0.0  # per row: ceil(factor * length * k / num_experts) slots per expert;
    # 0 or None = dropless (tokens sorted by expert, grouped matmuls)
    moe_renormalize: bool = True  # top-k gate weights rescaled to sum to 1 (Mixtral); False = raw softmax (Switch;
    # with top-1, renormalising makes every gate weight 1 and only the router losses train the router)
    moe_shared_expert: bool = False  # a dense expert every token goes through, added to the routed experts' output
    moe_aux_loss_weight: float = 0.01  # Switch load-balancing loss (1.0 for perfectly uniform routing)
    moe_z_loss_weight: float = 0.0  # router z-loss: mean logsumexp(router logits)^2 (ST-MoE uses 1e-3)
    moe_router_jitter: float = 0.0  # training only: router input scaled by uniform noise in [1 - j, 1 + j]

    # ----------------------------------------------------------------- derived
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    @property
    def gated(self) -> bool:
        return ACTIVATIONS[self.activation][1]

    @property
    def expert_mlp_dim(self) -> int:
        return self.moe_mlp_dim or self.mlp_dim

    @property
    def scan_period(self) -> int:
        """Layers per step of a scanned stack: moe_every with experts (k-1 dense layers and one MoE), else 1."""
        return self.moe_every if self.num_experts else 1

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i (0-based, in each stack) has a mixture of experts instead of the dense MLP."""
        return self.num_experts > 0 and (i + 1) % self.moe_every == 0

    # -------------------------------------------------------------- building
    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | ml_collections.ConfigDict, prefix: str = "model") -> "ModelConfig":
        items = dict(d.to_dict() if isinstance(d, ml_collections.ConfigDict) else d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(items) - names)
        if unknown:
            raise ConfigError(
                f"unknown field(s) {', '.join(prefix + '.' + u for u in unknown)}; "
                f"valid fields: {', '.join(sorted(names))}"
            )
        if "lora_targets" in items and items["lora_targets"] is not None:
            items["lora_targets"] = tuple(items["lora_targets"])
        return cls(**items)._validated(prefix)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)._validated()

    def __post_init__(self):
        self._validated()

    def _validated(self, prefix: str = "model") -> "ModelConfig":
        def fail(field, msg):
            raise ConfigError(f"{prefix}.{field}: {msg}")

        def choice(field, options):
            value = getattr(self, field)
            if value not in options:
                fail(field, f"unknown value {value!r}; choose one of {', '.join(map(repr, options))}")

        choice("family", FAMILIES)
        choice("activation", tuple(ACTIVATIONS))
        choice("norm", NORMS)
        choice("norm_position", NORM_POSITIONS)
        choice("position", POSITIONS)
        choice("attention_kernel", KERNELS)
        choice("remat", REMAT_POLICIES)
        choice("dtype", DTYPES)
        choice("param_dtype", DTYPES)
        for field in ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_dim", "max_length"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                fail(field, f"must be a positive integer, got {getattr(self, field)!r}")
        for field in ("num_decoder_layers", "num_kv_heads", "head_dim"):
            v = getattr(self, field)
            if v is not None and (not isinstance(v, int) or v <= 0):
                fail(field, f"must be a positive integer or None, got {v!r}")
        if self.num_heads % self.kv_heads:
            fail(
                "num_kv_heads",
                f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.kv_heads}; "
                "grouped-query attention needs each kv head shared by a whole number of query heads",
            )
        if self.head_dim is None and self.d_model % self.num_heads:
            fail(
                "num_heads",
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                "change one of them or set model.head_dim explicitly",
            )
        if self.position == "rope" and self.head_size % 2:
            fail("head_dim", f"rotary positions need an even head dimension, got {self.head_size}")
        if self.position == "sinusoidal" and self.d_model % 2:
            fail("d_model", f"sinusoidal positions need an even d_model, got {self.d_model}")
        if self.position == "relative" and self.relative_buckets < 2:
            fail("relative_buckets", "need at least 2 buckets")
        for field in ("dropout_rate", "attention_dropout_rate"):
            if not 0.0 <= getattr(self, field) < 1.0:
                fail(field, f"must be in [0, 1), got {getattr(self, field)}")
        if self.attention_kernel == "dot_product" and self.attention_dropout_rate > 0:
            fail(
                "attention_dropout_rate",
                "jax.nn.dot_product_attention has no attention-probability dropout; set it to 0.0 or use "
                "model.attention_kernel='reference' or 'blockwise'",
            )
        if self.attention_block_size <= 0:
            fail("attention_block_size", f"must be positive, got {self.attention_block_size}")
        if self.scale_tied_logits and not self.tie_embeddings:
            fail("scale_tied_logits", "only applies with model.tie_embeddings=True")
        if self.family != "encoder_decoder" and self.num_decoder_layers is not None:
            fail("num_decoder_layers", f"only used by family='encoder_decoder', not {self.family!r}; set it to None")
        if self.family != "encoder" and self.type_vocab_size:
            fail("type_vocab_size", "token-type embeddings are for the encoder family (BERT)")
        if self.family != "encoder" and (self.num_labels or self.num_tags):
            fail("num_labels", "classification heads are built on the encoder family")
        if self.lora_rank < 0:
            fail("lora_rank", f"must be >= 0, got {self.lora_rank}")
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad:
            fail("lora_targets", f"unknown target(s) {bad}; choose from {LORA_TARGETS}")
        self._validate_moe(fail)
        if not isinstance(self.scan_layers, bool):
            fail("scan_layers", f"must be True or False, got {self.scan_layers!r}")
        if self.scan_layers:
            for field, n in (("num_layers", self.num_layers), ("num_decoder_layers", self.decoder_layers)):
                if n % self.scan_period:
                    fail(field, f"{n} layers do not split into scan steps of model.moe_every={self.moe_every} layers "
                                f"(one MoE layer each); make it a multiple of {self.moe_every} or set "
                                "model.scan_layers=False")
        return self

    def _validate_moe(self, fail):
        if not isinstance(self.num_experts, int) or self.num_experts < 0:
            fail("num_experts", f"must be a non-negative integer (0 = no mixture of experts), got {self.num_experts!r}")
        if not self.num_experts:
            if self.moe_shared_expert:
                fail("moe_shared_expert", "needs model.num_experts > 0")
            return
        if not isinstance(self.experts_per_token, int) or not 1 <= self.experts_per_token <= self.num_experts:
            fail("experts_per_token", f"must be between 1 and model.num_experts={self.num_experts}, "
                                      f"got {self.experts_per_token!r}")
        if not isinstance(self.moe_every, int) or self.moe_every < 1:
            fail("moe_every", f"must be a positive integer, got {self.moe_every!r}")
        if self.moe_every > self.num_layers:
            fail("moe_every", f"{self.moe_every} > model.num_layers={self.num_layers} leaves no MoE layer")
        if self.moe_mlp_dim is not None and (not isinstance(self.moe_mlp_dim, int) or self.moe_mlp_dim <= 0):
            fail("moe_mlp_dim", f"must be a positive integer or None, got {self.moe_mlp_dim!r}")
        if self.moe_capacity_factor is not None and self.moe_capacity_factor < 0:
            fail("moe_capacity_factor", f"must be >= 0 (0 = dropless), got {self.moe_capacity_factor!r}")
        for field in ("moe_aux_loss_weight", "moe_z_loss_weight"):
            if getattr(self, field) < 0:
                fail(field, f"must be >= 0, got {getattr(self, field)}")
        if not 0.0 <= self.moe_router_jitter < 1.0:
            fail("moe_router_jitter", f"must be in [0, 1), got {self.moe_router_jitter}")


def model_config_dict(**overrides) -> ml_collections.ConfigDict:
    """The `model` section of a config file: ModelConfig defaults with `overrides` applied and checked."""
    cfg = ModelConfig(**overrides)
    d = dataclasses.asdict(cfg)
    d["lora_targets"] = list(d["lora_targets"])
    # Fields whose default is None must still accept ints from the command line.
    return ml_collections.ConfigDict(d, type_safe=False)
