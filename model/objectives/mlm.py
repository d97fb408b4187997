"""Masked language modelling (BERT, Devlin et al. 2019), with dynamic masking (RoBERTa).

Of the non-special tokens, `mask_prob` (15%) are selected; of those 80% become [MASK], 10% a
random token and 10% stay unchanged. Masks are drawn anew for every batch. Logits are computed
only at the selected positions, which is where the loss is.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.data import chunk_rows, pack_stream
from model.transformer import Transformer, activation_fn

ARCH = "encoder"
IGNORE = -100


@dataclass
class MaskingConfig:
    mask_prob: float = 0.15
    mask_token_ratio: float = 0.8
    random_token_ratio: float = 0.1


def make_examples(tokens: np.ndarray, offsets: np.ndarray, seq_len: int, specials: dict[str, int]) -> np.ndarray:
    """Rows of `[CLS] doc [SEP] doc [SEP] ...`, packed to exactly `seq_len` tokens."""
    body = chunk_rows(pack_stream(tokens, offsets, specials["sep"]), seq_len - 1, seq_len - 1)
    cls = np.full((len(body), 1), specials["cls"], dtype=body.dtype)
    return np.concatenate([cls, body], axis=1)


def mask_tokens(
    input_ids: torch.Tensor,
    special_ids: list[int],
    mask_id: int,
    vocab_size: int,
    cfg: MaskingConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The BERT 80/10/10 corruption. Returns (corrupted ids, labels with IGNORE where not selected)."""
    ids = input_ids.clone()
    labels = input_ids.clone()
    device = ids.device

    def rand(shape):
        return torch.rand(shape, generator=generator, device=device)

    special = torch.isin(ids, torch.tensor(special_ids, device=device))
    selected = (rand(ids.shape) < cfg.mask_prob) & ~special
    labels[~selected] = IGNORE
    to_mask = selected & (rand(ids.shape) < cfg.mask_token_ratio)
    # Of the rest, random : unchanged = random_token_ratio : (1 - mask - random).
    rest = 1.0 - cfg.mask_token_ratio
    p_random = cfg.random_token_ratio / rest if rest > 0 else 0.0
    to_random = selected & ~to_mask & (rand(ids.shape) < p_random)
    ids[to_mask] = mask_id
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, device=device)
    # A random replacement is never a special token.
    random_ids = torch.where(torch.isin(random_ids, torch.tensor(special_ids, device=device)), input_ids, random_ids)
    ids[to_random] = random_ids[to_random]
    return ids, labels


class MLMHead(nn.Module):
    """BERT's prediction head: dense -> GELU -> LayerNorm -> decoder tied to the input embeddings."""

    def __init__(self, cfg: ModelConfig, embedding: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = activation_fn(cfg.activation)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.embedding = embedding
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(self.act(self.dense(hidden))), self.embedding.weight, self.bias)


class MaskedLM(nn.Module):
    def __init__(self, cfg: ModelConfig, masking: MaskingConfig | None = None, special_ids: list[int] | None = None, mask_id: int = 4):
        super().__init__()
        self.cfg = cfg
        self.backbone = Transformer(cfg)
        self.head = MLMHead(cfg, self.backbone.tok_emb)
        self.masking = masking or MaskingConfig()
        self.special_ids = special_ids or [cfg.pad_id]
        self.mask_id = mask_id

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.backbone(input_ids, attention_mask))

    def forward(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        ids, labels = mask_tokens(rows, self.special_ids, self.mask_id, self.cfg.vocab_size, self.masking, generator)
        hidden = self.backbone(ids, attention_mask=rows != self.cfg.pad_id)
        selected = labels != IGNORE
        logits = self.head(hidden[selected])
        target = labels[selected]
        loss = F.cross_entropy(logits.float(), target)
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == target).float().mean()
        return loss, {"masked_accuracy": accuracy, "n_predicted": target.numel()}

    def flops_per_token(self, seq_len: int) -> float:
        d, v = self.cfg.d_model, self.cfg.vocab_size
        head = 6 * (d * d + d * v) * self.masking.mask_prob  # the head runs on selected tokens only
        return self.backbone.flops_per_token(seq_len) + head


def build(cfg: ModelConfig, train_cfg=None, specials: dict[str, int] | None = None) -> MaskedLM:
    masking = MaskingConfig()
    if train_cfg is not None:
        masking = MaskingConfig(train_cfg.mask_prob, train_cfg.mask_token_ratio, train_cfg.random_token_ratio)
    specials = specials or {}
    return MaskedLM(cfg, masking, sorted(set(specials.values())) or None, specials.get("mask", 4))
