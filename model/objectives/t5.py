"""Span corruption (T5, Raffel et al. 2020) on an encoder-decoder.

The packed stream (a `[SEP]` after every document) is cut into raw spans of `raw` tokens. In
each span `round(raw * noise_density)` tokens are noise, grouped into `round(noise / mean_span)`
spans whose lengths (and the lengths of the clean stretches between them) come from T5's random
segmentation (`random_spans_noise_mask`: a clean stretch first, a noise span last). The encoder
reads the span with every noise span replaced by one sentinel (ascending: `<extra_id_0>` first)
plus a final EOS; the decoder predicts `sentinel_0 span_0 sentinel_1 span_1 ... EOS` (EOS is the
tokenizer's `[SEP]`). As T5's `compute_input_and_target_lengths` does, `raw` is the longest span
whose corrupted input is at most `seq_len`; the input is then exactly `seq_len` tokens, and the
target width is fixed too, so an example is stored as one row `[inputs | targets]` and
`span_widths` (called by the example maker and by the model) says where it splits.

The noise masks are drawn when the examples are made, from `numpy.random.default_rng(seed)`, so
examples are reproducible; T5 draws them in its input pipeline, once per pass over the data, which
is the same thing for a single pass. The model is T5 v1.0 (`t5-small` and friends): shared
embedding, relative position buckets, ReLU FFN, RMSNorm, no biases, unscaled attention with T5's
initialisation, and an LM head tied to the embedding whose input is scaled by d_model**-0.5.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.config import ConfigError, ModelConfig, TrainConfig
from model.data import chunk_rows, pack_stream
from model.losses import IGNORE, lm_loss
from model.transformer import Attention, MLP, Transformer

ARCH = "encoder-decoder"

ROWS_PER_CHUNK = 1 << 14  # bounds the int64 / bool temporaries of the example maker


@dataclass(frozen=True)
class SpanWidths:
    raw: int  # tokens cut from the stream per example
    noise: int  # of those, corrupted
    spans: int  # noise spans (= sentinels) per example
    inputs: int  # clean tokens + one sentinel per span + EOS (= seq_len)
    targets: int  # one sentinel per span + noise tokens + EOS


def noise_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a raw span, with T5's guards against degenerate masks."""
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    return noise, max(int(round(noise / mean_span)), 1)


def span_widths(seq_len: int, noise_density: float, mean_span: float) -> SpanWidths:
    """The widths for an encoder input of exactly `seq_len` tokens (T5's `random_spans_helper`)."""
    if not 0 < noise_density < 1:
        raise ConfigError(f"train.noise_density={noise_density} must be between 0 and 1")
    if mean_span < 1:
        raise ConfigError(f"train.mean_span={mean_span} must be at least 1")
    if seq_len < 4:
        raise ConfigError(f"train.seq_len={seq_len} is too short for span corruption; use at least 4")

    def widths(raw: int) -> SpanWidths:
        noise, spans = noise_counts(raw, noise_density, mean_span)
        return SpanWidths(raw, noise, spans, raw - noise + spans + 1, noise + spans + 1)

    raw = seq_len - 1  # its input is at most seq_len; each extra raw token adds 0 or 1 input tokens
    while widths(raw + 1).inputs <= seq_len:
        raw += 1
    w = widths(raw)
    if w.spans > w.raw - w.noise:
        raise ConfigError(f"train.noise_density={noise_density} leaves fewer clean tokens than noise spans; lower it")
    return w


def split_row(rows, cfg: TrainConfig | SpanWidths):
    """(inputs, targets) of rows laid out `[inputs | targets]` (numpy or torch, one row or a batch)."""
    w = cfg if isinstance(cfg, SpanWidths) else span_widths(cfg.seq_len, cfg.noise_density, cfg.mean_span)
    if rows.shape[-1] != w.inputs + w.targets:
        raise ValueError(f"span-corruption rows are {w.inputs} input + {w.targets} target tokens wide for "
                         f"train.seq_len={w.inputs}, got {rows.shape[-1]}; re-run the examples stage")
    return rows[..., : w.inputs], rows[..., w.inputs :]


def sentinel_range(specials: dict[str, int], needed: int) -> int:
    """The first sentinel id, after checking that the tokenizer has `needed` of them."""
    have = specials["sentinel_last"] - specials["sentinel"] + 1 if "sentinel" in specials else 0
    if have < needed:
        raise ConfigError(f"span corruption needs {needed} sentinel tokens per example but the tokenizer has {have}; "
                          f"set tokenizer.sentinels to at least {needed} (or lower train.seq_len or "
                          "train.noise_density, or raise train.mean_span)")
    return specials["sentinel"]


def random_segmentation(rng: np.random.Generator, n_rows: int, n_items: int, n_segments: int) -> np.ndarray:
    """(n_rows, n_segments) lengths: `n_items` split at random into non-empty segments (T5's shuffle)."""
    starts = np.tile(np.arange(n_items - 1) < n_segments - 1, (n_rows, 1))
    starts = rng.permuted(starts, axis=1)  # which of the n_items - 1 gaps begin a new segment
    cuts = (np.flatnonzero(starts) % (n_items - 1) + 1).reshape(n_rows, n_segments - 1)
    bounds = np.concatenate([np.zeros((n_rows, 1), np.int64), cuts, np.full((n_rows, 1), n_items)], axis=1)
    return np.diff(bounds, axis=1)


def random_spans_noise_mask(rng: np.random.Generator, n_rows: int, w: SpanWidths) -> np.ndarray:
    """(n_rows, raw) bool, True = noise: clean and noise stretches alternate, clean first (T5)."""
    noise_lengths = random_segmentation(rng, n_rows, w.noise, w.spans)
    clean_lengths = random_segmentation(rng, n_rows, w.raw - w.noise, w.spans)
    interleaved = np.stack([clean_lengths, noise_lengths], axis=2).reshape(n_rows, 2 * w.spans)
    span_starts = np.cumsum(interleaved, axis=1)[:, :-1]
    indicator = np.zeros((n_rows, w.raw), np.int64)
    np.put_along_axis(indicator, span_starts, 1, axis=1)
    return np.cumsum(indicator, axis=1) % 2 == 1


def corrupt(raw: np.ndarray, noise: np.ndarray, sentinel: int, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets): each noise span becomes one sentinel in the inputs; the targets hold the
    spans, each after its sentinel (T5's `noise_span_to_unique_sentinel` and its complement)."""
    before = np.zeros_like(noise)
    before[:, 1:] = noise[:, :-1]
    noise_start = noise & ~before
    clean_start = ~noise & (before | (np.arange(noise.shape[1]) == 0))

    def squeeze(keep: np.ndarray, start: np.ndarray) -> np.ndarray:
        # Every row keeps the same number of tokens, so the kept ones reshape into a rectangle.
        values = np.where(start, sentinel + np.cumsum(start, axis=1) - 1, raw)
        kept = values[keep].reshape(len(raw), -1)
        return np.concatenate([kept, np.full((len(raw), 1), eos, kept.dtype)], axis=1)

    return squeeze(~noise | noise_start, noise_start), squeeze(noise | clean_start, clean_start)


def make_examples(tokens: np.ndarray, offsets: np.ndarray, cfg: TrainConfig, specials: dict[str, int],
                  word_starts: np.ndarray | None = None) -> np.ndarray:
    w = span_widths(cfg.seq_len, cfg.noise_density, cfg.mean_span)
    sentinel = sentinel_range(specials, w.spans)
    raw = chunk_rows(pack_stream(tokens, offsets, specials["sep"]), w.raw, w.raw)
    rng = np.random.default_rng(cfg.seed)
    rows = np.empty((len(raw), w.inputs + w.targets), dtype=raw.dtype)
    for start in range(0, len(raw), ROWS_PER_CHUNK):
        block = raw[start : start + ROWS_PER_CHUNK].astype(np.int64)
        inputs, targets = corrupt(block, random_spans_noise_mask(rng, len(block), w), sentinel, specials["sep"])
        rows[start : start + len(block)] = np.concatenate([inputs, targets], axis=1)
    return rows


class SpanCorruptionLM(nn.Module):
    """T5 v1.0: a bidirectional encoder, a causal decoder with cross-attention, one shared embedding."""

    def __init__(self, cfg: ModelConfig, widths: SpanWidths, noise_density: float = 0.15, mean_span: float = 3.0,
                 pad_id: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.widths = widths
        self.pad_id = cfg.pad_id if pad_id is None else pad_id  # also the decoder's start token, as in T5
        self.noise_density, self.mean_span = noise_density, mean_span
        self.encoder = Transformer(cfg)
        self.decoder = Transformer(cfg, causal=True, cross_attention=True, n_layers=cfg.n_decoder_layers or cfg.n_layers,
                                   tok_emb=self.encoder.tok_emb)
        self.backbone = self.encoder  # what fine-tuning reads
        with torch.no_grad():
            self.apply(self._init_t5)
            nn.init.normal_(self.encoder.tok_emb.weight, std=1.0)

    def _init_t5(self, module: nn.Module) -> None:
        """HF `T5PreTrainedModel._init_weights` (factor 1). Attention is unscaled, so the 1/sqrt(d_head)
        lives in the query's init; with N(0, 0.02) the logits would start far too flat."""
        d, d_kv, d_ff = self.cfg.d_model, self.cfg.d_model // self.cfg.n_heads, self.cfg.d_ff
        q_std, kv_std = (d * d_kv) ** -0.5, d ** -0.5
        if isinstance(module, Attention):
            if module.cross:
                nn.init.normal_(module.q.weight, std=q_std)
                nn.init.normal_(module.kv.weight, std=kv_std)
            else:
                nn.init.normal_(module.qkv.weight[:d], std=q_std)
                nn.init.normal_(module.qkv.weight[d:], std=kv_std)
            nn.init.normal_(module.proj.weight, std=(self.cfg.n_heads * d_kv) ** -0.5)
        elif isinstance(module, MLP):
            nn.init.normal_(module.fc.weight, std=d ** -0.5)
            nn.init.normal_(module.proj.weight, std=d_ff ** -0.5)
        elif isinstance(module, Transformer) and module.rel_bias is not None:
            nn.init.normal_(module.rel_bias.weight, std=d ** -0.5)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        # T5 v1.0 ties the head to the embedding (std 1) and rescales its input to keep logits O(1).
        return F.linear(hidden * self.cfg.d_model ** -0.5, self.encoder.tok_emb.weight)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               decoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
        memory = self.encoder(input_ids, attention_mask)
        return self.lm_head(self.decoder(decoder_input_ids, memory=memory, memory_mask=attention_mask))

    def forward(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        # The masks were drawn when the examples were made; `generator` is unused. Rows come from a
        # packed stream and are never padded, so the encoder needs no padding mask.
        inputs, targets = split_row(rows, self.widths)
        pad = self.pad_id
        decoder_inputs = torch.cat([torch.full_like(targets[:, :1], pad), targets[:, :-1]], dim=1)
        hidden = self.decoder(decoder_inputs, memory=self.encoder(inputs))
        labels = targets.masked_fill(targets == pad, IGNORE)
        # T5 v1.0 rescales the head's input by d_model ** -0.5 (see lm_head).
        loss, stats = lm_loss(hidden * self.cfg.d_model ** -0.5, self.encoder.tok_emb.weight, labels)
        return loss, {**({"token_accuracy": stats["accuracy"]} if stats else {}), "n_predicted": targets.numel()}

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per encoder input token (forward + backward).

        Encoder stack at `seq_len`; decoder stack at the target width, scaled by target / input tokens,
        with cross-attention scores over `seq_len` memory positions, except that the cross-attention
        key / value projections run on the encoder's tokens, not the decoder's; plus the tied LM head
        (d_model x vocab) on every target token.
        """
        w = span_widths(seq_len, self.noise_density, self.mean_span)
        ratio = w.targets / w.inputs
        kv = sum(blk.cross.kv.weight.numel() for blk in self.decoder.blocks)
        decoder = self.decoder.flops_per_token(w.targets, memory_len=w.inputs) - 6 * kv
        head = 6 * self.cfg.d_model * self.cfg.vocab_size
        return self.encoder.flops_per_token(w.inputs) + ratio * (decoder + head) + 6 * kv


def build(cfg: ModelConfig, train_cfg: TrainConfig | None = None, specials: dict[str, int] | None = None) -> SpanCorruptionLM:
    train_cfg = train_cfg or TrainConfig()
    widths = span_widths(train_cfg.seq_len, train_cfg.noise_density, train_cfg.mean_span)
    if max(widths.inputs, widths.targets) > cfg.max_seq_len:
        raise ConfigError(f"train.seq_len={train_cfg.seq_len} exceeds model.max_seq_len={cfg.max_seq_len}")
    pad = (specials or {}).get("pad", cfg.pad_id)
    return SpanCorruptionLM(cfg, widths, train_cfg.noise_density, train_cfg.mean_span, pad)


def hf_exports(model: SpanCorruptionLM, specials: dict[str, int]) -> dict[str, tuple[dict, dict]]:
    from model.hf.t5 import t5_config, t5_state_dict

    return {"": (t5_state_dict(model), t5_config(model.cfg, specials))}
