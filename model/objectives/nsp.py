"""Masked LM + a sentence-pair task: next sentence prediction (BERT) or sentence order prediction (ALBERT).

Every example is `[CLS] A [SEP] B [SEP]`; the [CLS] state goes through BERT's pooler (dense + tanh)
and a two-way classifier. For `nsp` (Devlin et al. 2019) a negative replaces B with a span of the
same length from a different, random document; for `sop` (Lan et al. 2020) a negative is the
in-order pair swapped, `[CLS] B [SEP] A [SEP]`, so topic cues cannot solve it. Labels: 1 = B is the
continuation of A (in order), 0 = not.

The warehouse stores a flat token stream without sentence boundaries, so "sentences" are token
spans: each document is cut into chunks of up to seq_len - 3 tokens and each chunk is split at a
random token. The loss is `mlm_weight * L_MLM + L_sentence` (dynamic 80/10/10 masking, as `mlm`);
`mlm_weight: 0` skips the masking and the MLM head and trains the sentence task alone.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.config import ConfigError, ModelConfig, TrainConfig
from model.objectives.mlm import IGNORE, MaskingConfig, MLMHead, mask_tokens
from model.transformer import Transformer, init_weights

ARCH = "encoder"
_BLOCK_ROWS = 1 << 15  # rows assembled at a time: bounds the (rows, seq_len) index arrays


def _chunks(offsets: np.ndarray, body: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(document, start in the stream, length) of every chunk of up to `body` tokens, per document."""
    lengths = np.diff(offsets)
    per_doc = -(-lengths // body)  # ceil
    doc = np.repeat(np.arange(len(lengths)), per_doc)
    first = np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
    within = (np.arange(len(doc)) - first) * body
    start = offsets[doc] + within
    length = np.minimum(body, lengths[doc] - within)
    return doc, start, length


def _other_document_spans(doc: np.ndarray, span: np.ndarray, offsets: np.ndarray, rng: np.random.Generator
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of a random span of `span` tokens in a random document other than `doc`.

    Uniform over the other documents that are long enough; when none is, the longest other
    document is taken whole (a shorter B, which is rare and still a valid negative).
    """
    lengths = np.diff(offsets)
    order = np.argsort(lengths, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    first_long = np.searchsorted(lengths[order], span, side="left")
    n_long = len(lengths) - first_long  # documents of at least `span` tokens; `doc` itself is one of them
    pick = first_long + (rng.random(len(doc)) * np.maximum(n_long - 1, 1)).astype(np.int64)
    pick = np.where(pick >= rank[doc], pick + 1, pick)  # skip `doc` itself
    other = order[np.minimum(pick, len(order) - 1)]
    short = n_long < 2
    if short.any():
        longest, second = order[-1], order[-2]
        other[short] = np.where(doc[short] == longest, second, longest)
    length = np.minimum(span, lengths[other])
    start = offsets[other] + (rng.random(len(doc)) * (lengths[other] - length + 1)).astype(np.int64)
    return start, length


def _assemble(tokens: np.ndarray, s1: np.ndarray, l1: np.ndarray, s2: np.ndarray, l2: np.ndarray,
              label: np.ndarray, seq_len: int, specials: dict[str, int]) -> np.ndarray:
    """Rows `[CLS] tokens[s1:s1+l1] [SEP] tokens[s2:s2+l2] [SEP] pad... | label`."""
    col = np.arange(seq_len)[None, :]
    l1, l2, s1, s2 = l1[:, None], l2[:, None], s1[:, None], s2[:, None]
    in_a = (col >= 1) & (col <= l1)
    in_b = (col >= l1 + 2) & (col < l1 + 2 + l2)
    src = np.where(in_a, s1 + col - 1, np.where(in_b, s2 + col - l1 - 2, 0))
    body = np.where(col >= l1 + 3 + l2, specials["pad"], specials["sep"])
    body = np.where(col == 0, specials["cls"], body)
    body = np.where(in_a | in_b, tokens[src], body)
    return np.concatenate([body, label[:, None]], axis=1).astype(tokens.dtype)


def make_examples(tokens: np.ndarray, offsets: np.ndarray, cfg: TrainConfig, specials: dict[str, int],
                  word_starts: np.ndarray | None = None) -> np.ndarray:
    """Rows of width seq_len + 1: `[CLS] A [SEP] B [SEP]` padded to seq_len, then the label.

    Exactly half the rows are negatives (an odd last row is dropped), in a seeded random order.
    """
    if cfg.seq_len < 5:
        raise ConfigError(f"train.seq_len={cfg.seq_len} is too short for [CLS] A [SEP] B [SEP]; use at least 5")
    offsets = np.asarray(offsets, dtype=np.int64)
    rng = np.random.default_rng(cfg.seed)
    doc, start, length = _chunks(offsets, cfg.seq_len - 3)
    keep = length >= 2
    doc, start, length = doc[keep], start[keep], length[keep]
    n = len(doc) - len(doc) % 2
    doc, start, length = doc[:n], start[:n], length[:n]
    if n == 0:
        return np.empty((0, cfg.seq_len + 1), dtype=tokens.dtype)
    split = rng.integers(1, length)  # A = chunk[:split], B = chunk[split:], both non-empty
    label = rng.permutation(np.arange(n) % 2)  # exactly n / 2 positives
    s1, l1, s2, l2 = start, split, start + split, length - split
    neg = label == 0
    if cfg.objective == "sop":
        s1, l1, s2, l2 = np.where(neg, s2, s1), np.where(neg, l2, l1), np.where(neg, s1, s2), np.where(neg, l1, l2)
    else:
        if len(offsets) < 3 and neg.any():
            raise ConfigError("next sentence prediction needs at least two documents in every split")
        other_start, other_len = _other_document_spans(doc[neg], l2[neg], offsets, rng)
        s2, l2 = s2.copy(), l2.copy()
        s2[neg], l2[neg] = other_start, other_len
    return np.concatenate([
        _assemble(tokens, s1[i:i + _BLOCK_ROWS], l1[i:i + _BLOCK_ROWS], s2[i:i + _BLOCK_ROWS], l2[i:i + _BLOCK_ROWS],
                  label[i:i + _BLOCK_ROWS], cfg.seq_len, specials)
        for i in range(0, n, _BLOCK_ROWS)
    ])


def token_types(ids: torch.Tensor, sep_id: int) -> torch.Tensor:
    """0 for `[CLS] A [SEP]`, 1 from the token after the first [SEP] on (BERT's segment ids)."""
    sep = (ids == sep_id).long()
    return ((sep.cumsum(1) - sep) > 0).long()


class SentencePairLM(nn.Module):
    """BERT with its pre-training heads: MLM (tied to the embeddings), pooler and the 2-way classifier.

    The MLM head exists even when `mlm_weight` is 0 (it is then never called), so every model
    has the same parameters and exports as a whole BertForPreTraining.
    """

    loss_is_token_cross_entropy = False  # a sum of losses: no perplexity

    def __init__(self, cfg: ModelConfig, masking: MaskingConfig | None = None, special_ids: list[int] | None = None,
                 specials: dict[str, int] | None = None, mlm_weight: float = 1.0):
        super().__init__()
        specials = specials or {}
        self.cfg = cfg
        self.backbone = Transformer(cfg)
        self.head = MLMHead(cfg, self.backbone.tok_emb)
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model)
        self.classifier = nn.Linear(cfg.d_model, 2)
        self.pooler.apply(init_weights)
        self.classifier.apply(init_weights)
        self.masking = masking or MaskingConfig()
        self.special_ids = special_ids or [cfg.pad_id]
        self.mask_id = specials.get("mask", 4)
        self.sep_id = specials.get("sep", 3)
        self.mlm_weight = mlm_weight

    def sentence_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler(hidden[:, 0])))

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLM logits at every position, sentence logits): BertForPreTraining's two outputs.

        Sentence index 0 means "B follows A" (in order), index 1 "it does not": transformers'
        `next_sentence_label` convention, so an export means the same thing. (The label column of
        a row keeps 1 = is next.)
        """
        hidden = self.backbone(input_ids, attention_mask, token_type_ids)
        return self.head(hidden), self.sentence_logits(hidden)

    def corrupt(self, ids: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dynamic 80/10/10 masking; [CLS], [SEP] and padding are never selected."""
        return mask_tokens(ids, self.special_ids, self.mask_id, self.cfg.vocab_size, self.masking, generator)

    def forward(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """`n_predicted` counts the predictions the loss averages: one sentence label per row plus
        the masked tokens (none when the MLM is off)."""
        ids, label = rows[:, :-1], rows[:, -1]
        target = 1 - label  # classifier index 0 = "is next", as in BertForPreTraining
        types, attention = token_types(ids, self.sep_id), ids != self.cfg.pad_id
        mlm = self.mlm_weight > 0
        inputs, mlm_labels = self.corrupt(ids, generator) if mlm else (ids, None)
        hidden = self.backbone(inputs, attention_mask=attention, token_type_ids=types)
        sent = self.sentence_logits(hidden)
        loss = F.cross_entropy(sent.float(), target)
        with torch.no_grad():
            stats = {"sentence_accuracy": (sent.argmax(-1) == target).float().mean()}
        n = label.numel()
        if mlm:
            selected = mlm_labels != IGNORE
            logits, mlm_target = self.head(hidden[selected]), mlm_labels[selected]
            # A batch with no selected token (tiny rows) adds nothing instead of a NaN.
            mlm_loss = F.cross_entropy(logits.float(), mlm_target, reduction="sum") / max(mlm_target.numel(), 1)
            loss = self.mlm_weight * mlm_loss + loss
            with torch.no_grad():
                hits = (logits.argmax(-1) == mlm_target).float()
                stats["masked_accuracy"] = hits.mean() if mlm_target.numel() else 0.0
            n += mlm_target.numel()
        stats["n_predicted"] = n
        return loss, stats

    def flops_per_token(self, seq_len: int) -> float:
        d = self.cfg.d_model
        head = self.head.flops_per_token() * self.masking.mask_prob if self.mlm_weight > 0 else 0.0
        # The pooler and the classifier run once per row, on [CLS].
        sentence = 6 * (d * d + d * 2) / seq_len
        return self.backbone.flops_per_token(seq_len) + head + sentence


def build(cfg: ModelConfig, train_cfg: TrainConfig | None = None, specials: dict[str, int] | None = None
          ) -> SentencePairLM:
    train_cfg = train_cfg or TrainConfig()
    specials = specials or {}
    if train_cfg.mlm_weight < 0:
        raise ConfigError(f"train.mlm_weight={train_cfg.mlm_weight} must be 0 (sentence task alone) or positive")
    return SentencePairLM(cfg, MaskingConfig.of(train_cfg), sorted(set(specials.values())) or None, specials,
                          train_cfg.mlm_weight)


def hf_exports(model: SentencePairLM, specials: dict[str, int]) -> dict[str, tuple[dict, dict]]:
    """A BertForPreTraining for both `nsp` and `sop`.

    ALBERT's order head has the same shape as BERT's (a 2-way classifier on the pooled [CLS]), so a
    `sop` model exports as BertForPreTraining too (not AlbertForPreTraining, whose encoder shares
    one layer's weights): `seq_relationship_logits[:, 0]` then means "in order".
    """
    from model.hf.bert import bert_config
    from model.hf.bert_pretraining import pretraining_state_dict

    return {"": (pretraining_state_dict(model), bert_config(model.cfg, specials, architecture="BertForPreTraining"))}
