"""Model and training configuration as plain data.

Sizes are data (litgpt style): `ModelConfig.from_name("tiny", arch="encoder")`. The architecture
defaults per family are the ones a stock Hugging Face class expresses (BERT for the encoder,
GPT-2 for the decoder), so every default model exports to `transformers` with identical outputs.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Dimensions only; the architecture family (encoder / decoder) adds the rest.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(n_layers=2, d_model=128, n_heads=2, d_ff=512),
    "mini": dict(n_layers=4, d_model=256, n_heads=4, d_ff=1024),
    "small": dict(n_layers=4, d_model=512, n_heads=8, d_ff=2048),
    "base": dict(n_layers=12, d_model=768, n_heads=12, d_ff=3072),
}

# What makes an encoder BERT, a decoder GPT-2 and an encoder-decoder T5 (v1.0).
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "encoder": dict(norm="post", activation="gelu", ln_eps=1e-12, n_segments=2, embed_norm=True),
    "decoder": dict(norm="pre", activation="gelu_tanh", ln_eps=1e-5, n_segments=0, embed_norm=False),
    "encoder-decoder": dict(norm="pre", norm_kind="rms", bias=False, position="relative", scale_attn=False,
                            activation="relu", ln_eps=1e-6, n_segments=0, embed_norm=False),
}
CHOICES = {"norm": ("post", "pre"), "norm_kind": ("layer", "rms"), "position": ("learned", "sinusoidal", "relative"),
           "activation": ("gelu", "gelu_tanh", "relu")}


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message says what to change."""


@dataclass
class ModelConfig:
    name: str = "custom"
    arch: str = "encoder"  # encoder (bidirectional) | decoder (causal) | encoder-decoder
    vocab_size: int = 8192
    max_seq_len: int = 512
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 2
    d_ff: int = 512
    n_decoder_layers: int = 0  # encoder-decoder only; 0: n_layers
    norm: str = "post"  # post-LN (BERT) | pre-LN (GPT-2, T5)
    norm_kind: str = "layer"  # layer (LayerNorm) | rms (T5's RMSNorm)
    bias: bool = True  # biases in linear layers and LayerNorms (T5 has none)
    position: str = "learned"  # learned | sinusoidal (fixed) | relative (T5 buckets)
    rel_buckets: int = 32
    rel_max_distance: int = 128
    scale_attn: bool = True  # 1/sqrt(d_head) in attention (T5 folds it into its init)
    activation: str = "gelu"  # gelu (erf) | gelu_tanh | relu
    ln_eps: float = 1e-12
    n_segments: int = 2  # token-type embeddings; 0 for none
    embed_norm: bool = True  # LayerNorm after the embeddings (BERT)
    embed_size: int = 0  # embedding width when it differs from d_model (ELECTRA's generator); 0: d_model
    dropout: float = 0.0
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ARCH_DEFAULTS:
            raise ConfigError(f"model.arch={self.arch!r} is unknown; use one of {sorted(ARCH_DEFAULTS)}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"model.{key}={getattr(self, key)!r} is unknown; use one of {', '.join(allowed)}")
        if self.position == "sinusoidal" and self.d_model % 2:
            raise ConfigError(f"model.position=sinusoidal needs an even model.d_model, not {self.d_model}")

    @classmethod
    def from_name(cls, name: str, arch: str = "encoder", **overrides: Any) -> "ModelConfig":
        """A named size, or `custom` with every dimension given in `overrides` (a user-defined size)."""
        if name == "custom":
            missing = [k for k in SIZES["tiny"] if k not in overrides]
            if missing:
                raise ConfigError(f"model size custom needs model.overrides.{missing[0]} "
                                  f"(give all of {', '.join(SIZES['tiny'])})")
        elif name not in SIZES:
            raise ConfigError(f"model size {name!r} is unknown; use one of {', '.join(SIZES)}, "
                              "or custom with the dimensions under model.overrides")
        if arch not in ARCH_DEFAULTS:
            raise ConfigError(f"model.arch={arch!r} is unknown; use one of {sorted(ARCH_DEFAULTS)}")
        return cls(name=name, arch=arch, **{**SIZES.get(name, {}), **ARCH_DEFAULTS[arch], **overrides})

    @property
    def causal(self) -> bool:
        return self.arch == "decoder"


@dataclass
class TrainConfig:
    """Everything `python -m model.train` needs; saved beside every checkpoint."""

    objective: str = "mlm"
    model: ModelConfig = field(default_factory=ModelConfig)
    data_dir: str = ""  # folder with <split>.npy example rows made by the objective
    out_dir: str = ""
    seq_len: int = 128
    batch_size: int = 32
    max_steps: int = 200
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_interval: int = 50
    eval_batches: int = 20
    log_interval: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: str = "auto"  # auto (on for CUDA) | true | false
    # Dense bf16 TFLOP/s of one device, the denominator of the logged MFU; 0: looked up from the GPU's
    # name (model.train.PEAK_TFLOPS), and no MFU where the name is not there (the CPU).
    peak_tflops: float = 0.0
    num_threads: int = 0  # CPU threads; 0 leaves torch's default
    max_flops: float = 0.0  # stop at this many training FLOPs instead of max_steps (equal-compute studies); 0: off
    # Masked LM family (mlm, mlm-static, mlm-wwm, nsp, sop, electra)
    mask_prob: float = 0.15
    mask_token_ratio: float = 0.8
    random_token_ratio: float = 0.1
    whole_word: bool = False  # select whole words, not sub-word tokens
    static_masking: bool = False  # masks drawn once when examples are made (BERT), not per batch (RoBERTa)
    static_copies: int = 10  # static masking: each row duplicated with this many different masks
    mlm_weight: float = 1.0  # nsp / sop: L = mlm_weight * L_MLM + L_sentence; 0 trains the sentence task alone
    generator_ratio: float = 0.25  # electra: generator width / discriminator width
    disc_weight: float = 50.0  # electra: L = L_gen + disc_weight * L_disc
    noise_density: float = 0.15  # t5 span corruption
    mean_span: float = 3.0  # t5 span corruption
    specials: dict[str, int] = field(default_factory=dict)  # pad, unk, cls, sep, mask, sentinel ids of the tokenizer
    grad_accum_steps: int = 1  # micro-batches of batch_size per optimizer step
    checkpoint_interval: int = 0  # steps between resumable checkpoints; 0: eval_interval
    keep_checkpoints: int = 2  # the last K resumable checkpoints are kept, plus the best by val loss
    resume: bool = True  # continue from the newest valid checkpoint in out_dir when there is one
    nonfinite: str = "stop"  # stop (checked every log_interval, no host sync per step) | skip (the step, syncs)
    # Continual pretraining: start from this checkpoint (same objective, model and tokenizer) and count steps,
    # tokens and FLOPs on from its own; max_steps more steps follow, under a schedule that warms up again.
    init_from: str = ""
    init_optimizer: str = "restore"  # restore (the checkpoint's AdamW moments, when it has them) | fresh
    activation_checkpointing: bool = False  # recompute each block's activations in the backward (less memory)
    # Several processes (torchrun). Launch settings: a run saved with one world size resumes with another.
    # batch_size stays the global batch: each of the nproc_per_node * nnodes processes takes its slice.
    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str = ""  # host:port of the rendezvous, needed when nnodes > 1
    parallelism: str = "ddp"  # ddp (a replica per process) | fsdp (FSDP2: parameters sharded, per block)

    def __post_init__(self) -> None:
        if self.nonfinite not in ("stop", "skip"):
            raise ConfigError(f"train.nonfinite={self.nonfinite!r} is unknown; use stop or skip")
        if self.init_optimizer not in ("restore", "fresh"):
            raise ConfigError(f"train.init_optimizer={self.init_optimizer!r} is unknown; use restore or fresh")
        if self.parallelism not in ("ddp", "fsdp"):
            raise ConfigError(f"train.parallelism={self.parallelism!r} is unknown; use ddp or fsdp")
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ConfigError("train.nproc_per_node and train.nnodes must be at least 1")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError(f"train.nnodes={self.nnodes} needs train.rdzv_endpoint (host:port of the first node)")
        if self.batch_size % (self.nproc_per_node * self.nnodes):
            raise ConfigError(f"train.batch_size={self.batch_size} (the global batch) is not divisible by the "
                              f"{self.nproc_per_node * self.nnodes} processes; make it a multiple of "
                              "nproc_per_node * nnodes")
        # YAML's `compile: true` arrives as the string "True": compare lower-cased, refuse the rest.
        self.compile = str(self.compile).lower()
        if self.compile not in ("auto", "true", "false"):
            raise ConfigError(f"train.compile={self.compile!r} is unknown; use auto, true or false")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision={self.precision!r} is unknown; use auto, fp32 or bf16")
        if self.peak_tflops < 0:
            raise ConfigError(f"train.peak_tflops={self.peak_tflops} must be 0 (look it up) or a positive TFLOP/s")
        if self.grad_accum_steps < 1:
            raise ConfigError(f"train.grad_accum_steps={self.grad_accum_steps} must be at least 1")
        if not 0 < self.mask_prob < 1:
            raise ConfigError(f"train.mask_prob={self.mask_prob} must be between 0 and 1")
        if self.mask_token_ratio + self.random_token_ratio > 1:
            raise ConfigError("train.mask_token_ratio + train.random_token_ratio must not exceed 1")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def load_dataclass(cls: type, data: dict[str, Any] | None, where: str = "") -> Any:
    """Build a (nested) dataclass from a dict, rejecting unknown keys with the path that is wrong."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}{unknown[0]}"
        raise ConfigError(f"unknown config key {key!r}; valid keys{' under ' + where.rstrip('.') if where else ''}: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if _is_dataclass_type(tp) and isinstance(value, dict):
            value = load_dataclass(tp, value, f"{where}{name}.")
        kwargs[name] = _coerce(value, tp, f"{where}{name}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:  # a dataclass's own check (__post_init__) is a config mistake too
        prefix = where.rstrip(".") or cls.__name__
        raise ConfigError(str(exc) if prefix in str(exc) else f"{prefix}: {exc}") from None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Accept YAML/CLI scalars for the declared type (e.g. '3' for int), reject the rest clearly."""
    origin = typing.get_origin(tp)
    if tp is Any or value is None or _is_dataclass_type(tp):
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if _is_dataclass_type(item_tp):
            return [v if isinstance(v, item_tp) else load_dataclass(item_tp, v, f"{key}[{i}].") for i, v in enumerate(value)]
        return [_coerce(v, item_tp, key) for v in value]
    if origin in (dict,):
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        return value
    try:
        if tp is bool and isinstance(value, str):
            if value.lower() in ("true", "1", "yes", "on"):
                return True
            if value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if tp in (int, float) and isinstance(value, bool):
            raise ValueError(value)
        return tp(value) if tp in (int, float, str, bool) else value
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r} expects {getattr(tp, '__name__', tp)}, got {value!r}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


# How a run is launched, not what it computes: a run saved under one setting resumes under another.
LAUNCH_KEYS = ("nproc_per_node", "nnodes", "rdzv_endpoint", "parallelism", "activation_checkpointing",
               "num_threads", "device", "compile", "peak_tflops")


def run_identity(cfg: "TrainConfig") -> dict[str, Any]:
    """The config minus its launch settings: what names a run's folder, so relaunching it with more
    processes (or on another device) finds and resumes the same checkpoints."""
    return {k: v for k, v in to_dict(cfg).items() if k not in LAUNCH_KEYS}


def read_train_config(path: str | Path) -> TrainConfig:
    """A resolved training config written as JSON (beside a checkpoint, or for `model.train`)."""
    return load_dataclass(TrainConfig, json.loads(Path(path).read_text()))
