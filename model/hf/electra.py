"""ELECTRA names: the discriminator as ElectraForPreTraining, the generator as ElectraForMaskedLM.

Both stacks use BERT's layer names under `electra.`; the generator adds `embeddings_project`
(its embeddings are the discriminator's width, its layers narrower). Its output layer
(`generator_lm_head.weight`) is tied to the word embeddings, so only the bias is written.
"""
from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.hf import ExportError, weight_and_bias
from model.hf.bert import encoder_state_dict
from model.transformer import Transformer


def electra_encoder_state_dict(bb: Transformer) -> dict[str, torch.Tensor]:
    if bb.seg_emb is None:  # ElectraEmbeddings always has a token-type table
        raise ExportError("an ELECTRA export needs model.n_segments >= 1, this model has 0")
    sd = encoder_state_dict(bb, "electra.")
    if bb.emb_proj is not None:
        sd.update(weight_and_bias("electra.embeddings_project", bb.emb_proj))
    return sd


def discriminator_state_dict(backbone: Transformer, head: nn.Module) -> dict[str, torch.Tensor]:
    return {
        **electra_encoder_state_dict(backbone),
        **weight_and_bias("discriminator_predictions.dense", head.dense),
        **weight_and_bias("discriminator_predictions.dense_prediction", head.dense_prediction),
    }


def generator_state_dict(backbone: Transformer, head: nn.Module) -> dict[str, torch.Tensor]:
    """`head` is an `MLMHead` (dense -> gelu -> LayerNorm -> tied decoder + bias)."""
    return {
        **electra_encoder_state_dict(backbone),
        **weight_and_bias("generator_predictions.dense", head.dense),
        **weight_and_bias("generator_predictions.LayerNorm", head.norm),
        "generator_lm_head.bias": head.bias,
    }


def electra_config(cfg: ModelConfig, specials: dict[str, int], architecture: str) -> dict:
    return {
        "architectures": [architecture], "model_type": "electra",
        "vocab_size": cfg.vocab_size, "embedding_size": cfg.embed_size or cfg.d_model, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.d_ff,
        # HF reads hidden_act for the layers and the discriminator head; the generator head is always gelu.
        "hidden_act": "gelu", "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
        "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.n_segments,
        "layer_norm_eps": cfg.ln_eps, "pad_token_id": specials.get("pad", cfg.pad_id),
        "tie_word_embeddings": True,
    }
