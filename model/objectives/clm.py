"""Autoregressive (causal) language modelling (GPT, Radford et al. 2018): predict the next token.

Documents are packed into one stream with a separator after each, cut into rows of seq_len + 1
tokens overlapping by one, so every token of the stream is a target exactly once.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig, TrainConfig
from model.data import chunk_rows, pack_stream
from model.losses import lm_loss
from model.transformer import Transformer

ARCH = "decoder"


def make_examples(tokens: np.ndarray, offsets: np.ndarray, cfg: TrainConfig, specials: dict[str, int],
                  word_starts: np.ndarray | None = None) -> np.ndarray:
    return chunk_rows(pack_stream(tokens, offsets, specials["sep"]), cfg.seq_len + 1, cfg.seq_len)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Transformer(cfg)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # The output projection is tied to the input embeddings, as in GPT-2.
        return F.linear(self.backbone(input_ids, attention_mask), self.backbone.tok_emb.weight)

    def forward(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        inputs, targets = rows[:, :-1], rows[:, 1:]
        loss, stats = lm_loss(self.backbone(inputs), self.backbone.tok_emb.weight, targets)
        return loss, {**({"next_token_accuracy": stats["accuracy"]} if stats else {}), "n_predicted": targets.numel()}

    def flops_per_token(self, seq_len: int) -> float:
        return self.backbone.flops_per_token(seq_len) + 6 * self.cfg.d_model * self.cfg.vocab_size


def build(cfg: ModelConfig, train_cfg=None, specials: dict[str, int] | None = None) -> CausalLM:
    return CausalLM(cfg)


def hf_exports(model: CausalLM, specials: dict[str, int]) -> dict[str, tuple[dict, dict]]:
    from model.hf.gpt2 import causal_lm_state_dict, gpt2_config

    return {"": (causal_lm_state_dict(model), gpt2_config(model.cfg, specials))}
