"""Transformer blocks shared by every objective: encoder (BERT), decoder (GPT-2), encoder-decoder (T5).

One block type serves all three. Post-LN + GELU(erf) + biases reproduces BERT; pre-LN + GELU(tanh)
+ a final LayerNorm reproduces GPT-2; pre-RMSNorm + ReLU + no biases + relative position buckets
+ unscaled attention reproduces T5 (whose decoder blocks add cross-attention). Attention goes
through `scaled_dot_product_attention`, so CUDA runs the flash / memory-efficient kernels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.config import ModelConfig


def activation_fn(name: str):
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"unknown activation {name!r}; use gelu, gelu_tanh or relu")


def norm_layer(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.d_model
    if cfg.norm_kind == "rms":
        return nn.RMSNorm(dim, eps=cfg.ln_eps)
    return nn.LayerNorm(dim, eps=cfg.ln_eps, bias=cfg.bias)


class Attention(nn.Module):
    """Multi-head attention; self-attention (fused qkv) or cross-attention (q from x, k / v from memory)."""

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.cross = cross
        if cross:
            self.q = nn.Linear(d, d, bias=cfg.bias)
            self.kv = nn.Linear(d, 2 * d, bias=cfg.bias)
        else:
            self.qkv = nn.Linear(d, 3 * d, bias=cfg.bias)
        self.proj = nn.Linear(d, d, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.scale = None if cfg.scale_attn else 1.0  # T5 folds the 1/sqrt(d_head) into its initialisation

    def _heads(self, z: torch.Tensor) -> torch.Tensor:
        b, t, d = z.shape
        return z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False,
                memory: torch.Tensor | None = None) -> torch.Tensor:
        """`mask`: bool (True = may attend) or additive float, broadcastable to (B, heads, T, S)."""
        b, t, d = x.shape
        if self.cross:
            q, (k, v) = self.q(x), self.kv(memory).split(d, dim=2)
        else:
            q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)  # under autocast the additive bias must match the query dtype
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                           dropout_p=self.dropout if self.training else 0.0, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.act = activation_fn(cfg.activation)
        self.drop = nn.Dropout(cfg.dropout) if cfg.norm_kind == "rms" else nn.Identity()  # T5 drops inside the FFN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.drop(self.act(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, cross_attention: bool = False):
        super().__init__()
        self.pre_norm = cfg.norm == "pre"
        self.attn = Attention(cfg)
        self.ln_attn = norm_layer(cfg)
        self.cross = Attention(cfg, cross=True) if cross_attention else None
        self.ln_cross = norm_layer(cfg) if cross_attention else None
        self.mlp = MLP(cfg)
        self.ln_mlp = norm_layer(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False,
                memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.drop(self.attn(self.ln_attn(x), mask, is_causal))
            if self.cross is not None:
                x = x + self.drop(self.cross(self.ln_cross(x), memory_mask, memory=memory))
            return x + self.drop(self.mlp(self.ln_mlp(x)))
        x = self.ln_attn(x + self.drop(self.attn(x, mask, is_causal)))
        if self.cross is not None:
            x = self.ln_cross(x + self.drop(self.cross(x, memory_mask, memory=memory)))
        return self.ln_mlp(x + self.drop(self.mlp(x)))


def sinusoidal_positions(n: int, d: int) -> torch.Tensor:
    """The fixed sin / cos table of Vaswani et al. (2017)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(n, d)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: d // 2])
    return table


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's buckets: exact for small distances, logarithmic up to `max_distance`, one bucket beyond."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).long() * num_buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    max_exact = num_buckets // 2
    large = max_exact + (
        torch.log(relative.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(relative < max_exact, relative, large)


class Transformer(nn.Module):
    """Embeddings + blocks; returns hidden states (B, T, d_model). Heads live with the objectives.

    `causal` defaults to the config's architecture (a decoder is causal); the decoder of an
    encoder-decoder passes `causal=True, cross_attention=True` and reads `memory` (the encoder's
    output). `attn_mask` (B, 1, T, T, True = may attend) replaces the built-in pattern, as the
    prefix LM needs.
    """

    activation_checkpointing = False  # set by `enable_activation_checkpointing` (a training setting, not the model's)

    def __init__(self, cfg: ModelConfig, causal: bool | None = None, cross_attention: bool = False,
                 n_layers: int | None = None, tok_emb: nn.Embedding | None = None):
        super().__init__()
        self.cfg = cfg
        self.causal = cfg.causal if causal is None else causal
        emb = cfg.embed_size or cfg.d_model
        self.tok_emb = tok_emb if tok_emb is not None else nn.Embedding(cfg.vocab_size, emb)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, emb) if cfg.position == "learned" else None
        if cfg.position == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_positions(cfg.max_seq_len, emb), persistent=False)
        self.rel_bias = nn.Embedding(cfg.rel_buckets, cfg.n_heads) if cfg.position == "relative" else None
        self.seg_emb = nn.Embedding(cfg.n_segments, emb) if cfg.n_segments else None
        self.emb_norm = norm_layer(cfg, emb) if cfg.embed_norm else None
        self.emb_proj = nn.Linear(emb, cfg.d_model) if emb != cfg.d_model else None  # ELECTRA's small generator
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, cross_attention) for _ in range(n_layers or cfg.n_layers))
        self.final_norm = norm_layer(cfg) if cfg.norm == "pre" else None
        self.apply(init_weights)

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        t = input_ids.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(t, device=input_ids.device))
        elif self.cfg.position == "sinusoidal":
            x = x + self.pos_table[:t].to(x.dtype)
        if self.seg_emb is not None:
            x = x + self.seg_emb(token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids))
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = self.drop(x)
        return self.emb_proj(x) if self.emb_proj is not None else x

    def position_bias(self, t: int, device: torch.device) -> torch.Tensor:
        """(1, heads, T, T) additive attention bias from T5's relative position buckets."""
        pos = torch.arange(t, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], not self.causal,
                                           self.cfg.rel_buckets, self.cfg.rel_max_distance)
        return self.rel_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def self_attention_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                            attn_mask: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
        """The mask every block uses, and whether SDPA may take the fast causal path instead."""
        t = input_ids.shape[1]
        allowed = attn_mask
        if allowed is None and self.causal:
            # Decoders are right-padded, so causality alone keeps real tokens off padding.
            if self.rel_bias is None:
                return None, True
            allowed = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()[None, None]
        if allowed is None and attention_mask is not None:
            allowed = attention_mask.bool()[:, None, None, :]
        if self.rel_bias is None:
            return allowed, False
        bias = self.position_bias(t, input_ids.device)
        if allowed is not None:
            bias = bias.masked_fill(~allowed, torch.finfo(bias.dtype).min)
        return bias, False

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.embed(input_ids, token_type_ids)
        mask, is_causal = self.self_attention_mask(input_ids, attention_mask, attn_mask)
        cross = memory_mask.bool()[:, None, None, :] if memory_mask is not None else None
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only the block's input; recompute its activations in the backward (with the
                # same dropout masks: checkpoint restores the RNG state).
                x = checkpoint(block, x, mask, is_causal, memory, cross, use_reentrant=False)
            else:
                x = block(x, mask, is_causal, memory, cross)
        if self.final_norm is not None:
            x = self.drop(self.final_norm(x)) if self.cfg.norm_kind == "rms" else self.final_norm(x)
        return x

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        return n

    def flops_per_token(self, seq_len: int, memory_len: int = 0) -> float:
        """Training FLOPs per token (forward + backward): 6N plus the attention scores (PaLM appendix B).

        `memory_len` adds the cross-attention scores of a decoder. The output projection over the
        vocabulary is counted by the objective's head.
        """
        c = self.cfg
        layers = len(self.blocks)
        return 6 * self.num_params(non_embedding=True) + 12 * layers * c.d_model * (seq_len + memory_len)


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Checkpoint every block of every Transformer stack in `model`; returns how many stacks."""
    stacks = [m for m in model.modules() if isinstance(m, Transformer)]
    for stack in stacks:
        stack.activation_checkpointing = True
    return len(stacks)


def init_weights(module: nn.Module) -> None:
    # BERT / GPT-2 initialisation: N(0, 0.02), zero biases, unit norms.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float, device_type: str) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (not biases or norms); shared (tied) tensors appear once."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    decay = [p for n, p in params.items() if p.dim() >= 2]
    no_decay = [p for n, p in params.items() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=device_type in ("cuda", "cpu"))


def cosine_schedule(warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
