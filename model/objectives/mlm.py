"""Masked language modelling (BERT, Devlin et al. 2019): dynamic, static and whole-word masking.

Of the non-special tokens, `mask_prob` (15%) are selected; of those 80% become [MASK], 10% a
random token and 10% stay unchanged. Dynamic masking (RoBERTa, `mlm`) draws new masks for every
batch. Static masking (BERT, `mlm-static`) draws them once, when the examples are made, and keeps
`static_copies` copies of each row with different masks. Whole-word masking (`mlm-wwm`) selects
whole words (a word-start token and the continuation tokens after it), then applies 80/10/10 to
each of their tokens, as Google's BERT release does. Logits are computed only at the selected
positions, which is where the loss is.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig, TrainConfig
from model.data import WORD_STARTS_FILE, batch_rand, batch_randint, chunk_rows, pack_stream
from model.transformer import Transformer, activation_fn, norm_layer

ARCH = "encoder"
IGNORE = -100


@dataclass
class MaskingConfig:
    mask_prob: float = 0.15
    mask_token_ratio: float = 0.8
    random_token_ratio: float = 0.1

    @classmethod
    def of(cls, cfg: TrainConfig) -> "MaskingConfig":
        return cls(cfg.mask_prob, cfg.mask_token_ratio, cfg.random_token_ratio)


def packed_rows(tokens: np.ndarray, offsets: np.ndarray, seq_len: int, specials: dict[str, int]) -> np.ndarray:
    """Rows of `[CLS] doc [SEP] doc [SEP] ...`, packed to exactly `seq_len` tokens."""
    body = chunk_rows(pack_stream(tokens, offsets, specials["sep"]), seq_len - 1, seq_len - 1)
    cls = np.full((len(body), 1), specials["cls"], dtype=body.dtype)
    return np.concatenate([cls, body], axis=1)


def make_examples(tokens: np.ndarray, offsets: np.ndarray, cfg: TrainConfig, specials: dict[str, int],
                  word_starts: np.ndarray | None = None) -> np.ndarray:
    rows = packed_rows(tokens, offsets, cfg.seq_len, specials)
    if not cfg.static_masking:
        return rows
    return static_rows(rows, cfg, specials, word_starts)


def static_rows(rows: np.ndarray, cfg: TrainConfig, specials: dict[str, int], word_starts: np.ndarray | None) -> np.ndarray:
    """`static_copies` masked copies of every row, each `[corrupted ids | labels]` (label = pad where not selected).

    A selected token is never padding, so the pad id marks "no label" without a sign bit.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.from_numpy(rows.astype(np.int64)).repeat_interleave(cfg.static_copies, dim=0)
    starts = torch.from_numpy(word_starts) if cfg.whole_word and word_starts is not None else None
    vocab = len(word_starts) if word_starts is not None else int(ids.max(initial=0)) + 1
    corrupted, labels = mask_tokens(ids, sorted(set(specials.values())), specials["mask"], vocab, MaskingConfig.of(cfg),
                                    gen, starts)
    labels = torch.where(labels == IGNORE, specials["pad"], labels)
    return torch.cat([corrupted, labels], dim=1).numpy().astype(rows.dtype)


def select_words(ids: torch.Tensor, word_starts: torch.Tensor, special: torch.Tensor, prob: float,
                 rand) -> torch.Tensor:
    """Positions of whole words chosen with probability `prob` (each token follows its word's start)."""
    after_special = F.pad(special[:, :-1], (1, 0), value=True)  # a word never continues across [SEP] or [CLS]
    starts = word_starts.to(ids.device)[ids] | special | after_special
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    # Index of the word start each token belongs to: a running maximum over start positions.
    start_of = torch.cummax(torch.where(starts, positions, torch.zeros_like(positions)), dim=1).values
    chosen = rand(ids.shape) < prob
    return chosen.gather(1, start_of) & ~special


def mask_tokens(
    input_ids: torch.Tensor,
    special_ids: list[int],
    mask_id: int,
    vocab_size: int,
    cfg: MaskingConfig,
    generator: torch.Generator | None = None,
    word_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The BERT 80/10/10 corruption. Returns (corrupted ids, labels with IGNORE where not selected).

    With `word_starts` (a bool per vocabulary id), whole words are selected instead of tokens.
    """
    ids = input_ids.clone()
    labels = input_ids.clone()
    device = ids.device

    def rand(shape):  # drawn for the whole global batch, so a row's masks do not depend on the process holding it
        return batch_rand(shape, generator, device)

    special = torch.isin(ids, torch.tensor(special_ids, device=device))
    if word_starts is None:
        selected = (rand(ids.shape) < cfg.mask_prob) & ~special
    else:
        selected = select_words(ids, word_starts, special, cfg.mask_prob, rand)
    labels[~selected] = IGNORE
    to_mask = selected & (rand(ids.shape) < cfg.mask_token_ratio)
    # Of the rest, random : unchanged = random_token_ratio : (1 - mask - random).
    rest = 1.0 - cfg.mask_token_ratio
    p_random = cfg.random_token_ratio / rest if rest > 0 else 0.0
    to_random = selected & ~to_mask & (rand(ids.shape) < p_random)
    ids[to_mask] = mask_id
    random_ids = batch_randint(0, vocab_size, ids.shape, generator, device)
    # A random replacement is never a special token.
    random_ids = torch.where(torch.isin(random_ids, torch.tensor(special_ids, device=device)), input_ids, random_ids)
    ids[to_random] = random_ids[to_random]
    return ids, labels


class MLMHead(nn.Module):
    """BERT's prediction head: dense -> GELU -> LayerNorm -> decoder tied to the input embeddings.

    The dense layer maps to the embedding width, which differs from d_model in ELECTRA's generator.
    """

    def __init__(self, cfg: ModelConfig, embedding: nn.Embedding):
        super().__init__()
        emb = embedding.weight.shape[1]
        self.dense = nn.Linear(cfg.d_model, emb)
        self.act = activation_fn(cfg.activation)
        self.norm = norm_layer(cfg, emb)
        self.embedding = embedding
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(self.act(self.dense(hidden))), self.embedding.weight, self.bias)

    def flops_per_token(self) -> float:
        d, (v, e) = self.dense.in_features, self.embedding.weight.shape
        return 6 * (d * e + e * v)


class MaskedLM(nn.Module):
    def __init__(self, cfg: ModelConfig, masking: MaskingConfig | None = None, special_ids: list[int] | None = None,
                 mask_id: int = 4, static: bool = False, word_starts: WordStarts | None = None):
        super().__init__()
        self.cfg = cfg
        self.backbone = Transformer(cfg)
        self.head = MLMHead(cfg, self.backbone.tok_emb)
        self.masking = masking or MaskingConfig()
        self.special_ids = special_ids or [cfg.pad_id]
        self.mask_id = mask_id
        self.static = static
        self.word_starts = word_starts or WordStarts()

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.backbone(input_ids, attention_mask))

    def corrupt(self, rows: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input ids, labels, attention mask) of a batch: stored masks when static, fresh ones otherwise."""
        if self.static:
            ids, labels = rows.chunk(2, dim=1)
            labels = labels.masked_fill(labels == self.cfg.pad_id, IGNORE)
            return ids, labels, ids != self.cfg.pad_id
        ids, labels = mask_tokens(rows, self.special_ids, self.mask_id, self.cfg.vocab_size, self.masking, generator,
                                  self.word_starts())
        return ids, labels, rows != self.cfg.pad_id

    def masked_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        selected = labels != IGNORE
        logits = self.head(hidden[selected])
        target = labels[selected]
        loss = F.cross_entropy(logits.float(), target)
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == target).float().mean()
        return loss, {"masked_accuracy": accuracy, "n_predicted": target.numel()}

    def forward(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        ids, labels, attention = self.corrupt(rows, generator)
        return self.masked_loss(self.backbone(ids, attention_mask=attention), labels)

    def flops_per_token(self, seq_len: int) -> float:
        # The head runs on the selected tokens only.
        return self.backbone.flops_per_token(seq_len) + self.head.flops_per_token() * self.masking.mask_prob


class WordStarts:
    """The word-start table the examples stage wrote beside the rows, read when masking first needs it.

    Only dynamic whole-word masking in training needs it; a checkpoint loaded for fine-tuning or
    export never masks, so it must load even where its examples are gone.
    """

    def __init__(self, path: Path | None = None):
        self.path, self.table = path, None

    def __call__(self) -> torch.Tensor | None:
        if self.path is not None and self.table is None:
            if not self.path.exists():
                raise FileNotFoundError(f"whole-word masking needs {self.path}; re-run the examples stage")
            self.table = torch.from_numpy(np.load(self.path))
        return self.table


def load_word_starts(cfg: TrainConfig) -> WordStarts:
    needed = cfg.whole_word and not cfg.static_masking and cfg.data_dir
    return WordStarts(Path(cfg.data_dir) / WORD_STARTS_FILE if needed else None)


def build(cfg: ModelConfig, train_cfg: TrainConfig | None = None, specials: dict[str, int] | None = None) -> MaskedLM:
    train_cfg = train_cfg or TrainConfig()
    specials = specials or {}
    return MaskedLM(cfg, MaskingConfig.of(train_cfg), sorted(set(specials.values())) or None, specials.get("mask", 4),
                    static=train_cfg.static_masking, word_starts=load_word_starts(train_cfg))


def hf_exports(model: MaskedLM, specials: dict[str, int]) -> dict[str, tuple[dict, dict]]:
    from model.hf.bert import bert_config, masked_lm_state_dict

    return {"": (masked_lm_state_dict(model), bert_config(model.cfg, specials))}
