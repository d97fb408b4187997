"""Downstream fine-tuning: a pretrained backbone (or a random one, the floor) plus a classifier.

Four methods, as the articles describe them (`FinetuneConfig.method`):
- `full`: every weight trains with a small learning rate (BERT's recipe);
- `freeze`: the embeddings and the lower `freeze_layers` blocks stay fixed, the rest trains;
- `probe`: a linear classifier on frozen, mean-pooled features (computed once, standardised);
- `lora`: low-rank adapters on the attention projections through `peft`, plus the classifier.

Inputs are `[CLS] text [SEP] (pair [SEP])` for encoders and `text [SEP] (pair [SEP])` for decoders,
pooled by the mean over real tokens so every objective is read out the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from tokenizers import Tokenizer
from torch import nn

from model.config import ConfigError, ModelConfig
from model.train import resolve_device
from model.transformer import Transformer, configure_optimizer, cosine_schedule

METHODS = ("full", "freeze", "probe", "lora")
LORA_TARGETS = {  # peft matches a string target as a regular expression over module names
    "attention": r".*\.attn\.(qkv|proj)",
    "all-linear": r".*\.(attn\.(qkv|proj)|mlp\.(fc|proj))",
}


@dataclass
class FinetuneConfig:
    method: str = "full"
    epochs: int = 4
    lr: float = 3e-4
    # Learning rates to try; the study keeps, per pretrained model and method, the one with the best
    # mean validation accuracy over seeds (BERT's recipe), and reports test scores at that rate only.
    lr_grid: list[float] = field(default_factory=list)
    batch_size: int = 32
    max_len: int = 128
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    dropout: float = 0.1
    freeze_layers: int = -1  # `freeze`: how many lower blocks stay fixed; -1 = the lower half
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: str = "attention"  # attention | all-linear
    seed: int = 0
    num_threads: int = 0
    device: str = "auto"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown fine-tuning method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.lora_targets not in LORA_TARGETS:
            raise ConfigError(f"unknown lora_targets {self.lora_targets!r}; choose one of {', '.join(LORA_TARGETS)}")
        if self.epochs < 1 or self.lr <= 0 or self.batch_size < 1 or any(lr <= 0 for lr in self.lr_grid):
            raise ConfigError("fine-tuning needs epochs >= 1, lr > 0 and batch_size >= 1")


class SequenceClassifier(nn.Module):
    def __init__(self, backbone: Transformer, n_labels: int, dropout: float):
        super().__init__()
        self.backbone = backbone
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(backbone.cfg.d_model, n_labels)

    def features(self, ids: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
        hidden = self.backbone(ids, mask, token_type_ids=segments)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.drop(self.features(ids, mask, segments)))


def encode(texts: list[str], tokenizer: Tokenizer, cfg: ModelConfig, specials: dict[str, int], max_len: int,
           pairs: list[str] | None = None) -> list[tuple[list[int], list[int]]]:
    """(ids, segment ids) per example; a pair is truncated longest-first, as BERT's tokenizer does."""
    encoder = cfg.arch != "decoder"
    budget = min(max_len, cfg.max_seq_len) - (1 if encoder else 0) - (2 if pairs is not None else 1)
    firsts = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    seconds = [e.ids for e in tokenizer.encode_batch(pairs, add_special_tokens=False)] if pairs is not None else None
    cls, sep = ([specials["cls"]] if encoder else []), [specials["sep"]]
    out = []
    for i, a in enumerate(firsts):
        if seconds is None:
            ids = cls + a[:budget] + sep
            out.append((ids, [0] * len(ids)))
            continue
        b = seconds[i]
        while len(a) + len(b) > budget:
            if len(a) >= len(b):
                a = a[:-1]
            else:
                b = b[:-1]
        first = cls + a + sep
        out.append((first + b + sep, [0] * len(first) + [1] * (len(b) + 1)))
    return out


def _batches(seqs: list[tuple[list[int], list[int]]], labels: np.ndarray, batch_size: int, pad_id: int,
             rng: np.random.Generator | None):
    """Length-bucketed batches (little padding); shuffled when `rng` is given."""
    order = np.arange(len(seqs)) if rng is None else rng.permutation(len(seqs))
    chunks = [order[i : i + batch_size * 16] for i in range(0, len(order), batch_size * 16)]
    batches = []
    for chunk in chunks:
        chunk = sorted(chunk, key=lambda i: len(seqs[i][0]))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    for idx in batches:
        width = max(len(seqs[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        segments = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(seqs[i][0])] = torch.tensor(seqs[i][0])
            segments[row, : len(seqs[i][1])] = torch.tensor(seqs[i][1])
        yield ids, ids != pad_id, segments, torch.as_tensor(labels[idx]), idx


def _segments(backbone: Transformer, segments: torch.Tensor) -> torch.Tensor | None:
    return segments if backbone.seg_emb is not None else None  # models without segment embeddings ignore pairs' ids


@torch.no_grad()
def predict(model: nn.Module, backbone: Transformer, seqs, labels, batch_size: int, pad_id: int, device) -> np.ndarray:
    model.eval()
    preds = np.zeros(len(seqs), dtype=np.int64)
    for ids, mask, seg, _, idx in _batches(seqs, labels, batch_size * 2, pad_id, None):
        preds[idx] = model(ids.to(device), mask.to(device), _segments(backbone, seg.to(device))).argmax(-1).cpu().numpy()
    model.train()
    return preds


def freeze_lower(backbone: Transformer, k: int) -> int:
    """Fix the embeddings and the lower k blocks; returns k (resolved from -1 = the lower half)."""
    n = len(backbone.blocks)
    k = n // 2 if k < 0 else k
    if k > n:
        raise ConfigError(f"freeze_layers={k} but the model has {n} layers; set downstream freeze_layers <= {n}")
    for name in ("tok_emb", "pos_emb", "seg_emb", "rel_bias", "emb_norm", "emb_proj"):
        module = getattr(backbone, name)
        if module is not None:
            module.requires_grad_(False)
    for block in backbone.blocks[:k]:
        block.requires_grad_(False)
    return k


def with_lora(model: SequenceClassifier, cfg: FinetuneConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=LORA_TARGETS[cfg.lora_targets], modules_to_save=["classifier"])
    return get_peft_model(model, config)


class FeatureProbe(nn.Module):
    """The probe's classifier over cached, standardised features (a linear map of the raw ones)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, n_labels: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.classifier = nn.Linear(mean.numel(), n_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier((features - self.mean) / self.std)


@torch.no_grad()
def pooled_features(model: SequenceClassifier, seqs, batch_size: int, pad_id: int, device) -> torch.Tensor:
    model.eval()
    out = torch.zeros(len(seqs), model.backbone.cfg.d_model)
    for ids, mask, seg, _, idx in _batches(seqs, np.zeros(len(seqs), dtype=np.int64), batch_size * 2, pad_id, None):
        out[idx] = model.features(ids.to(device), mask.to(device), _segments(model.backbone, seg.to(device))).float().cpu()
    return out


def finetune(
    backbone: Transformer,
    tokenizer: Tokenizer,
    specials: dict[str, int],
    splits: dict[str, tuple[list[str], list[int]] | tuple[list[str], list[int], list[str] | None]],
    n_labels: int,
    cfg: FinetuneConfig,
    label: str = "finetune",
    features: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Train on splits['train'] with `cfg.method`; per-epoch validation accuracy and final predictions.

    A split is `(texts, labels)` or `(texts, labels, pairs)` for a text-pair task. The probe returns
    the frozen features it used under "features"; passing them back as `features` (same backbone,
    same splits) skips the forward passes, so a learning-rate grid and several seeds cost one.
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    mcfg, pad = backbone.cfg, backbone.cfg.pad_id
    data = {name: (encode(s[0], tokenizer, mcfg, specials, cfg.max_len, s[2] if len(s) > 2 else None), np.asarray(s[1]))
            for name, s in splits.items()}
    model = SequenceClassifier(backbone, n_labels, cfg.dropout).to(device)
    if cfg.method == "probe":
        return _train_probe(model, data, n_labels, cfg, pad, device, features)
    info = {}
    if cfg.method == "freeze":
        info["frozen_layers"] = freeze_lower(backbone, cfg.freeze_layers)
    trainable = with_lora(model, cfg) if cfg.method == "lora" else model
    info |= _param_counts(trainable)
    n_train = len(data["train"][0])
    steps = cfg.epochs * -(-n_train // cfg.batch_size)
    optimizer = configure_optimizer(trainable, cfg.lr, cfg.weight_decay, device.type)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(int(cfg.warmup_ratio * steps), steps, 0.0))
    params = [p for p in trainable.parameters() if p.requires_grad]
    rng = np.random.default_rng(cfg.seed)
    curve = []
    with Progress(transient=True) as progress:
        bar = progress.add_task(f"{label} ({cfg.method})", total=steps)
        for epoch in range(1, cfg.epochs + 1):
            losses = []
            for ids, mask, seg, y, _ in _batches(*data["train"], cfg.batch_size, pad, rng):
                logits = trainable(ids.to(device), mask.to(device), _segments(backbone, seg.to(device)))
                loss = F.cross_entropy(logits, y.to(device))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                progress.update(bar, advance=1)
            val_pred = predict(trainable, backbone, *data["validation"], cfg.batch_size, pad, device)
            curve.append({"epoch": epoch, "train_loss": float(np.mean(losses)),
                          "val_accuracy": float((val_pred == data["validation"][1]).mean())})
    predictions = {name: predict(trainable, backbone, seqs, labels, cfg.batch_size, pad, device).tolist()
                   for name, (seqs, labels) in data.items() if name != "train"}
    return _result(curve, predictions, data, info)


def _train_probe(model: SequenceClassifier, data: dict, n_labels: int, cfg: FinetuneConfig, pad: int, device,
                 features: dict[str, torch.Tensor] | None) -> dict:
    feats = features or {name: pooled_features(model, seqs, cfg.batch_size, pad, device) for name, (seqs, _) in data.items()}
    train_x, train_y = feats["train"], torch.as_tensor(data["train"][1])
    # Standardising is a linear map, so the probe stays linear; it only makes the optimisation well
    # conditioned when pretrained features are nearly collinear.
    probe = FeatureProbe(train_x.mean(0), train_x.std(0).clamp(min=1e-6), n_labels)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = -(-len(train_x) // cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(int(cfg.warmup_ratio * cfg.epochs * batches), cfg.epochs * batches, 0.0))
    gen = torch.Generator().manual_seed(cfg.seed)
    curve = []
    for epoch in range(1, cfg.epochs + 1):
        order, losses = torch.randperm(len(train_x), generator=gen), []
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = F.cross_entropy(probe(train_x[idx]), train_y[idx])
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        with torch.no_grad():
            val = probe(feats["validation"]).argmax(-1).numpy()
        curve.append({"epoch": epoch, "train_loss": float(np.mean(losses)),
                      "val_accuracy": float((val == data["validation"][1]).mean())})
    with torch.no_grad():
        predictions = {name: probe(x).argmax(-1).tolist() for name, x in feats.items() if name != "train"}
    info = {"trainable_params": sum(p.numel() for p in probe.parameters()),
            "total_params": sum(p.numel() for p in model.backbone.parameters()) + sum(p.numel() for p in probe.parameters())}
    return {**_result(curve, predictions, data, info), "features": feats}


def _param_counts(model: nn.Module) -> dict:
    return {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters())}


def _result(curve: list, predictions: dict, data: dict, info: dict) -> dict:
    return {"curve": curve, "predictions": predictions, "info": info,
            "labels": {name: labels.tolist() for name, (_, labels) in data.items() if name != "train"}}


def random_backbone(cfg: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg)
