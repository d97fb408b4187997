"""BERT names (BertForMaskedLM, and the encoder layout ELECTRA shares)."""
from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.hf import check_stock, weight_and_bias
from model.transformer import Transformer


def encoder_state_dict(bb: Transformer, prefix: str) -> dict[str, torch.Tensor]:
    """Embeddings and layers of a post-LN encoder under `prefix` ("bert." or "electra.")."""
    check_stock(bb.cfg, "BERT-style encoder", norm="post", norm_kind="layer", bias=True, position="learned",
                activation="gelu", embed_norm=True, scale_attn=True)
    sd = {
        f"{prefix}embeddings.word_embeddings.weight": bb.tok_emb.weight,
        f"{prefix}embeddings.position_embeddings.weight": bb.pos_emb.weight,
        f"{prefix}embeddings.token_type_embeddings.weight": bb.seg_emb.weight,
        **weight_and_bias(f"{prefix}embeddings.LayerNorm", bb.emb_norm),
    }
    for i, blk in enumerate(bb.blocks):
        p = f"{prefix}encoder.layer.{i}."
        for name, w, b in zip(("query", "key", "value"), blk.attn.qkv.weight.chunk(3), blk.attn.qkv.bias.chunk(3)):
            sd[f"{p}attention.self.{name}.weight"], sd[f"{p}attention.self.{name}.bias"] = w, b
        sd.update({
            **weight_and_bias(f"{p}attention.output.dense", blk.attn.proj),
            **weight_and_bias(f"{p}attention.output.LayerNorm", blk.ln_attn),
            **weight_and_bias(f"{p}intermediate.dense", blk.mlp.fc),
            **weight_and_bias(f"{p}output.dense", blk.mlp.proj),
            **weight_and_bias(f"{p}output.LayerNorm", blk.ln_mlp),
        })
    return sd


def mlm_head_state_dict(head: nn.Module) -> dict[str, torch.Tensor]:
    return {
        **weight_and_bias("cls.predictions.transform.dense", head.dense),
        **weight_and_bias("cls.predictions.transform.LayerNorm", head.norm),
        "cls.predictions.bias": head.bias,
    }


def masked_lm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**encoder_state_dict(model.backbone, "bert."), **mlm_head_state_dict(model.head)}


def bert_config(cfg: ModelConfig, specials: dict[str, int], architecture: str = "BertForMaskedLM") -> dict:
    return {
        "architectures": [architecture], "model_type": "bert",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.d_ff, "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
        "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.n_segments,
        "layer_norm_eps": cfg.ln_eps, "pad_token_id": specials.get("pad", cfg.pad_id),
        "tie_word_embeddings": True,
    }
