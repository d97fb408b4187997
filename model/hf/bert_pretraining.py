"""BertForPreTraining names: the encoder, the pooler, the MLM head and the sentence-pair head.

The MLM decoder is tied to the word embeddings (`tie_word_embeddings`), so only its bias is
stored, as for BertForMaskedLM.
"""
from __future__ import annotations

import torch
from torch import nn

from model.hf import weight_and_bias
from model.hf.bert import encoder_state_dict, mlm_head_state_dict


def pretraining_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model` has `backbone`, `head` (MLMHead), `pooler` (d -> d, tanh) and `classifier` (d -> 2)."""
    return {
        **encoder_state_dict(model.backbone, "bert."),
        **weight_and_bias("bert.pooler.dense", model.pooler),
        **mlm_head_state_dict(model.head),
        **weight_and_bias("cls.seq_relationship", model.classifier),
    }
