"""GPT-2 names (GPT2LMHeadModel)."""
from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.hf import check_stock, weight_and_bias


def causal_lm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    cfg, bb = model.cfg, model.backbone
    check_stock(cfg, "GPT-2", norm="pre", norm_kind="layer", bias=True, position="learned", activation="gelu_tanh",
                embed_norm=False, n_segments=0, scale_attn=True)
    sd = {
        "transformer.wte.weight": bb.tok_emb.weight,
        "transformer.wpe.weight": bb.pos_emb.weight,
        **weight_and_bias("transformer.ln_f", bb.final_norm),
    }
    for i, blk in enumerate(bb.blocks):
        p = f"transformer.h.{i}."
        # GPT-2 stores its projections as Conv1D, i.e. transposed nn.Linear weights.
        sd.update({
            **weight_and_bias(f"{p}ln_1", blk.ln_attn), **weight_and_bias(f"{p}ln_2", blk.ln_mlp),
            f"{p}attn.c_attn.weight": blk.attn.qkv.weight.t(), f"{p}attn.c_attn.bias": blk.attn.qkv.bias,
            f"{p}attn.c_proj.weight": blk.attn.proj.weight.t(), f"{p}attn.c_proj.bias": blk.attn.proj.bias,
            f"{p}mlp.c_fc.weight": blk.mlp.fc.weight.t(), f"{p}mlp.c_fc.bias": blk.mlp.fc.bias,
            f"{p}mlp.c_proj.weight": blk.mlp.proj.weight.t(), f"{p}mlp.c_proj.bias": blk.mlp.proj.bias,
        })
    return sd


def gpt2_config(cfg: ModelConfig, specials: dict[str, int]) -> dict:
    eos = specials.get("sep", 0)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
        "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len, "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.ln_eps, "bos_token_id": eos, "eos_token_id": eos,
        "pad_token_id": specials.get("pad", cfg.pad_id), "tie_word_embeddings": True,
    }
