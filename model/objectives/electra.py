"""Replaced token detection (ELECTRA, Clark et al. 2020).

A small masked-LM generator fills the masked positions with tokens sampled from its softmax; a
discriminator (the `backbone`, the encoder that fine-tuning uses) labels every token as original
or replaced. L = L_gen + disc_weight * L_disc. The samples are integer ids, so no gradient flows
from the discriminator's loss into the generator (the paper trains the generator by maximum
likelihood only). A sampled token equal to the original is labelled original, as in the paper.

The generator is `generator_ratio` of the discriminator's width (d_model, d_ff, heads), same
depth, and shares the discriminator's embeddings: word, position and token-type tables and the
embedding LayerNorm, as the reference implementation does (its generator reuses the
`electra/embeddings` scope); the generator projects them to its width (`emb_proj`, HF's
`embeddings_project`). Rows are MLM's: `[CLS] doc [SEP] doc ...`, masks drawn per batch (the
`electra` preset makes every selected token [MASK], so the generator never sees a random one).

Evaluation weighs a batch by `n_predicted`, here the number of non-padding tokens: the
discriminator's loss is a mean over them, and it is the term that dominates L. Per-batch means
of the generator statistics (`gen_loss`, `gen_accuracy`) are weighted the same way, which
differs from weighting by masked tokens by only the batch-to-batch noise in the masking rate.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.config import ConfigError, ModelConfig, TrainConfig
from model.objectives.mlm import (IGNORE, MaskingConfig, MLMHead, WordStarts, load_word_starts, mask_tokens,
                                  packed_rows)
from model.transformer import Transformer, activation_fn, init_weights

ARCH = "encoder"


def _check(cfg: TrainConfig) -> None:
    if cfg.static_masking:
        raise ConfigError("objective electra samples replacements per batch; set train.static_masking=false")


def make_examples(tokens: np.ndarray, offsets: np.ndarray, cfg: TrainConfig, specials: dict[str, int],
                  word_starts: np.ndarray | None = None) -> np.ndarray:
    _check(cfg)
    return packed_rows(tokens, offsets, cfg.seq_len, specials)


def generator_config(cfg: ModelConfig, ratio: float) -> ModelConfig:
    """The discriminator's config scaled by `ratio` in width; embeddings stay the discriminator's width."""
    if not 0 < ratio <= 1:
        raise ConfigError(f"train.generator_ratio={ratio} must be in (0, 1]; the paper uses 1/4 to 1/2")
    heads = max(1, round(cfg.n_heads * ratio))
    head_dim = max(1, round(cfg.d_model * ratio / heads))  # d_model a multiple of the heads by construction
    return dataclasses.replace(cfg, name=f"{cfg.name}-generator", d_model=heads * head_dim, n_heads=heads,
                               d_ff=max(1, round(cfg.d_ff * ratio)), embed_size=cfg.embed_size or cfg.d_model)


class DiscriminatorHead(nn.Module):
    """HF's ElectraDiscriminatorPredictions: dense -> activation -> one logit per token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = activation_fn(cfg.activation)
        self.dense_prediction = nn.Linear(cfg.d_model, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dense_prediction(self.act(self.dense(hidden))).squeeze(-1)

    def flops_per_token(self) -> float:
        d = self.dense.in_features
        return 6 * (d * d + d)


class Corruption(NamedTuple):
    gen_input: torch.Tensor  # (B, T) ids with [MASK] at the selected positions
    selected: torch.Tensor  # (B, T) bool: positions the generator predicts
    gen_logits: torch.Tensor  # (n_selected, V) generator logits at the selected positions
    disc_input: torch.Tensor  # (B, T) originals with the selected positions replaced by samples
    replaced: torch.Tensor  # (B, T) bool: the discriminator's labels (disc_input != original)
    attention: torch.Tensor  # (B, T) bool: not padding


class Electra(nn.Module):
    loss_is_token_cross_entropy = False  # a sum of losses: no perplexity

    def __init__(self, cfg: ModelConfig, masking: MaskingConfig | None = None, special_ids: list[int] | None = None,
                 mask_id: int = 4, pad_id: int | None = None, generator_ratio: float = 0.25,
                 disc_weight: float = 50.0, word_starts: WordStarts | None = None):
        super().__init__()
        self.cfg = cfg
        self.backbone = Transformer(cfg)  # the discriminator
        self.gen_cfg = generator_config(cfg, generator_ratio)
        self.gen_backbone = Transformer(self.gen_cfg, tok_emb=self.backbone.tok_emb)
        # Shared tables, not copies: one tensor, trained by both losses.
        for name in ("pos_emb", "seg_emb", "emb_norm"):
            if getattr(self.backbone, name) is not None:
                setattr(self.gen_backbone, name, getattr(self.backbone, name))
        self.gen_head = MLMHead(self.gen_cfg, self.backbone.tok_emb)
        self.disc_head = DiscriminatorHead(cfg)
        for module in (self.gen_head.dense, self.gen_head.norm, self.disc_head):
            module.apply(init_weights)
        self.masking = masking or MaskingConfig(mask_token_ratio=1.0, random_token_ratio=0.0)
        self.special_ids = special_ids or [cfg.pad_id]
        self.mask_id = mask_id
        self.pad_id = cfg.pad_id if pad_id is None else pad_id
        self.disc_weight = disc_weight
        self.word_starts = word_starts or WordStarts()

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Discriminator logits (B, T): > 0 means "replaced"."""
        return self.disc_head(self.backbone(input_ids, attention_mask))

    def generator_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.gen_head(self.gen_backbone(input_ids, attention_mask))

    def corrupt(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> Corruption:
        attention = rows != self.pad_id
        gen_input, labels = mask_tokens(rows, self.special_ids, self.mask_id, self.cfg.vocab_size, self.masking,
                                        generator, self.word_starts())
        selected = labels != IGNORE
        gen_logits = self.gen_head(self.gen_backbone(gen_input, attention_mask=attention)[selected])
        disc_input = rows.clone()
        if gen_logits.shape[0]:
            # Under several processes the masks above match one process's (drawn per global-batch row),
            # but these samples are drawn per process: N processes equal one in distribution only.
            with torch.no_grad():  # the samples are ids: nothing to differentiate, as in the paper
                probs = torch.softmax(gen_logits.detach().float(), dim=-1)
                disc_input[selected] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return Corruption(gen_input, selected, gen_logits, disc_input, disc_input != rows, attention)

    def losses(self, rows: torch.Tensor,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(L_gen, L_disc, stats), kept apart so a test can check which parameters each one reaches."""
        c = self.corrupt(rows, generator)
        target = rows[c.selected]
        n_masked = max(1, target.numel())  # a batch with nothing selected gives 0, not NaN
        gen_loss = F.cross_entropy(c.gen_logits.float(), target, reduction="sum") / n_masked
        disc_logits = self.logits(c.disc_input, c.attention)[c.attention].float()
        labels = c.replaced[c.attention].float()
        disc_loss = F.binary_cross_entropy_with_logits(disc_logits, labels)
        with torch.no_grad():
            stats = {
                "gen_loss": gen_loss.detach(),
                "disc_loss": disc_loss.detach(),
                "gen_accuracy": (c.gen_logits.argmax(-1) == target).float().sum() / n_masked,
                "disc_accuracy": ((disc_logits > 0) == labels.bool()).float().mean(),
                "replaced_fraction": labels.mean(),  # of the non-padding tokens
                "n_predicted": labels.numel(),
            }
        return gen_loss, disc_loss, stats

    def forward(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        gen_loss, disc_loss, stats = self.losses(rows, generator)
        return gen_loss + self.disc_weight * disc_loss, stats

    def flops_per_token(self, seq_len: int) -> float:
        disc = self.backbone.flops_per_token(seq_len) + self.disc_head.flops_per_token()
        # Transformer counts 6x its non-embedding parameters; the shared token-type table and
        # embedding LayerNorm are already in the discriminator's count.
        disc_params = {id(p) for p in self.backbone.parameters()}
        shared = sum(p.numel() for n, p in self.gen_backbone.named_parameters()
                     if id(p) in disc_params and not n.startswith(("tok_emb.", "pos_emb.")))
        gen = self.gen_backbone.flops_per_token(seq_len) - 6 * shared
        # The generator's head runs on the selected tokens only; sampling costs no matmul.
        return disc + gen + self.gen_head.flops_per_token() * self.masking.mask_prob


def build(cfg: ModelConfig, train_cfg: TrainConfig | None = None, specials: dict[str, int] | None = None) -> Electra:
    train_cfg = train_cfg or TrainConfig(mask_token_ratio=1.0, random_token_ratio=0.0)
    _check(train_cfg)
    if train_cfg.disc_weight < 0:
        raise ConfigError(f"train.disc_weight={train_cfg.disc_weight} must not be negative")
    specials = specials or {}
    return Electra(cfg, MaskingConfig.of(train_cfg), sorted(set(specials.values())) or None, specials.get("mask", 4),
                   specials.get("pad"), train_cfg.generator_ratio, train_cfg.disc_weight, load_word_starts(train_cfg))


def hf_exports(model: Electra, specials: dict[str, int]) -> dict[str, tuple[dict, dict]]:
    from model.hf.electra import discriminator_state_dict, electra_config, generator_state_dict

    return {
        "": (discriminator_state_dict(model.backbone, model.disc_head),
             electra_config(model.cfg, specials, "ElectraForPreTraining")),
        "generator": (generator_state_dict(model.gen_backbone, model.gen_head),
                      electra_config(model.gen_cfg, specials, "ElectraForMaskedLM")),
    }
