"""BertForPreTraining names: the encoder, the pooler, the MLM head and the sentence-pair head.

The MLM decoder is tied to the word embeddings (`tie_word_embeddings`), so only its bias is
stored, as for BertForMaskedLM.
"""
from __future__ import annotations

import torch
from torch import nn

from model.hf.bert import encoder_state_dict, mlm_head_state_dict


def pretraining_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model` has `backbone`, `head` (MLMHead), `pooler` (d -> d, tanh) and `classifier` (d -> 2)."""
    return {
        **encoder_state_dict(model.backbone, "bert."),
        "bert.pooler.dense.weight": model.pooler.weight,
        "bert.pooler.dense.bias": model.pooler.bias,
        **mlm_head_state_dict(model.head),
        "cls.seq_relationship.weight": model.classifier.weight,
        "cls.seq_relationship.bias": model.classifier.bias,
    }
