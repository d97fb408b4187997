"""T5 names (T5ForConditionalGeneration, T5 v1.0: ReLU FFN, tied and rescaled LM head)."""
from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.hf import check_stock
from model.transformer import Transformer


def check_t5(cfg: ModelConfig) -> None:
    check_stock(cfg, "T5", norm="pre", norm_kind="rms", bias=False, position="relative", activation="relu",
                scale_attn=False, embed_norm=False, n_segments=0, embed_size=0)


def stack_state_dict(stack: Transformer, prefix: str) -> dict[str, torch.Tensor]:
    """One T5Stack: block i holds layer.0 self-attention, [layer.1 cross-attention,] then the FFN."""
    d = stack.cfg.d_model
    sd = {
        f"{prefix}block.0.layer.0.SelfAttention.relative_attention_bias.weight": stack.rel_bias.weight,
        f"{prefix}final_layer_norm.weight": stack.final_norm.weight,
    }
    for i, blk in enumerate(stack.blocks):
        p = f"{prefix}block.{i}.layer."
        q, k, v = blk.attn.qkv.weight.split(d)
        sd.update({
            f"{p}0.SelfAttention.q.weight": q, f"{p}0.SelfAttention.k.weight": k,
            f"{p}0.SelfAttention.v.weight": v, f"{p}0.SelfAttention.o.weight": blk.attn.proj.weight,
            f"{p}0.layer_norm.weight": blk.ln_attn.weight,
        })
        ff = 1
        if blk.cross is not None:
            k, v = blk.cross.kv.weight.split(d)
            sd.update({
                f"{p}1.EncDecAttention.q.weight": blk.cross.q.weight, f"{p}1.EncDecAttention.k.weight": k,
                f"{p}1.EncDecAttention.v.weight": v, f"{p}1.EncDecAttention.o.weight": blk.cross.proj.weight,
                f"{p}1.layer_norm.weight": blk.ln_cross.weight,
            })
            ff = 2
        sd.update({
            f"{p}{ff}.DenseReluDense.wi.weight": blk.mlp.fc.weight,
            f"{p}{ff}.DenseReluDense.wo.weight": blk.mlp.proj.weight,
            f"{p}{ff}.layer_norm.weight": blk.ln_mlp.weight,
        })
    return sd


def t5_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    check_t5(model.cfg)
    shared = model.encoder.tok_emb.weight
    return {
        "shared.weight": shared, "encoder.embed_tokens.weight": shared, "decoder.embed_tokens.weight": shared,
        "lm_head.weight": shared,
        **stack_state_dict(model.encoder, "encoder."),
        **stack_state_dict(model.decoder, "decoder."),
    }


def t5_config(cfg: ModelConfig, specials: dict[str, int]) -> dict:
    check_t5(cfg)
    pad = specials.get("pad", cfg.pad_id)
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_model // cfg.n_heads, "d_ff": cfg.d_ff,
        "num_layers": cfg.n_layers, "num_decoder_layers": cfg.n_decoder_layers or cfg.n_layers,
        "num_heads": cfg.n_heads, "relative_attention_num_buckets": cfg.rel_buckets,
        "relative_attention_max_distance": cfg.rel_max_distance, "dropout_rate": cfg.dropout,
        "layer_norm_epsilon": cfg.ln_eps, "initializer_factor": 1.0, "feed_forward_proj": "relu",
        # True also tells transformers to scale the decoder output by d_model**-0.5 (T5 v1.0).
        "tie_word_embeddings": True, "is_encoder_decoder": True,
        "pad_token_id": pad, "eos_token_id": specials.get("sep", 1), "decoder_start_token_id": pad,
    }
