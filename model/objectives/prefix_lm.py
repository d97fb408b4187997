"""Prefix language modelling (UniLM, Dong et al. 2019; T5's prefix LM, Raffel et al. 2020).

A decoder (GPT-2 blocks) whose attention is bidirectional over a prefix and causal after it:
position i may attend to j when j <= i or j < p. Rows are the clm rows (seq_len + 1 tokens,
overlapping by one); each row draws its own prefix length p uniformly in [1, seq_len - 1] per
batch.

Which targets are scored: position i predicts token i + 1 of the row. The prefix tokens 0..p-1
are visible to every position (p - 1 layers of attention carry them anywhere), so predicting any
of them would be copying: the loss covers tokens p..seq_len only, i.e. positions i >= p - 1 of
the shifted layout (position p - 1 sees the whole prefix and predicts the first token after it).
With p = 1 this is exactly clm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.data import batch_randint
from model.objectives import clm
from model.objectives.mlm import IGNORE
from model.losses import lm_loss

ARCH = "decoder"
make_examples = clm.make_examples


def prefix_attention(prefix_len: torch.Tensor, t: int) -> torch.Tensor:
    """(B, 1, T, T) bool, True = may attend: causal, plus every position sees the first p tokens."""
    pos = torch.arange(t, device=prefix_len.device)
    causal = pos[None, :] <= pos[:, None]
    in_prefix = pos[None, None, :] < prefix_len[:, None, None]
    return (causal[None] | in_prefix)[:, None]


def draw_prefix(batch: int, t: int, generator: torch.Generator | None, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prefix lengths p in [1, t - 1], attention mask, loss mask: positions i >= p - 1)."""
    if t < 2:
        raise ValueError(f"a prefix LM needs rows of at least 3 tokens (seq_len >= 2), got seq_len={t}")
    p = batch_randint(1, t, (batch,), generator, device)  # per row of the global batch, whichever process holds it
    scored = torch.arange(t, device=device)[None, :] >= (p[:, None] - 1)
    return p, prefix_attention(p, t), scored


class PrefixLM(clm.CausalLM):
    """The autoregressive LM's model and FLOP count (the tied head runs on every position), with prefix attention."""

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               prefix_len: int | torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits; no `prefix_len` is plain causal attention (what a GPT-2 export computes)."""
        attn = None
        if prefix_len is not None:
            b, t = input_ids.shape
            p = torch.as_tensor(prefix_len, device=input_ids.device).expand(b)
            attn = prefix_attention(p, t)
            if attention_mask is not None:  # keep real tokens off right padding inside a long prefix
                attn = attn & attention_mask.bool()[:, None, None, :]
        # The output projection is tied to the input embeddings, as in GPT-2.
        return F.linear(self.backbone(input_ids, attention_mask, attn_mask=attn), self.backbone.tok_emb.weight)

    def forward(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        inputs, targets = rows[:, :-1], rows[:, 1:]
        b, t = inputs.shape
        _, attn, scored = draw_prefix(b, t, generator, rows.device)
        # The head runs on every position (static shapes under torch.compile); the loss on scored ones.
        hidden = self.backbone(inputs, attn_mask=attn)
        labels = targets.masked_fill(~scored, IGNORE)
        loss, stats = lm_loss(hidden, self.backbone.tok_emb.weight, labels)
        return loss, {**({"next_token_accuracy": stats["accuracy"]} if stats else {}), "n_predicted": scored.sum()}


def build(cfg: ModelConfig, train_cfg=None, specials: dict[str, int] | None = None) -> PrefixLM:
    return PrefixLM(cfg)


def hf_exports(model: PrefixLM, specials: dict[str, int]) -> dict[str, tuple[dict, dict]]:
    """GPT2LMHeadModel weights, which transformers runs causally: no stock class expresses prefix
    attention. The weights are the same, so it generates with the same parameters, but wherever a
    prefix longer than one token matters its outputs differ from ours (here the prefix positions
    see the whole prefix, and every later position reads those states); with p = 1 they agree.
    """
    return clm.hf_exports(model, specials)
