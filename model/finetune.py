"""Downstream fine-tuning: a pretrained backbone (or a random one, the floor) plus a classifier.

The whole network is trained with a small learning rate (full fine-tuning, as BERT did); inputs are
`[CLS] text [SEP]` for encoders and `text [SEP]` for decoders, pooled by the mean over real tokens
so every objective is read out the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from tokenizers import Tokenizer
from torch import nn

from model.config import ModelConfig
from model.train import resolve_device
from model.transformer import Transformer, configure_optimizer, cosine_schedule


@dataclass
class FinetuneConfig:
    epochs: int = 4
    lr: float = 3e-4
    batch_size: int = 32
    max_len: int = 128
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    dropout: float = 0.1
    seed: int = 0
    num_threads: int = 0
    device: str = "auto"


class SequenceClassifier(nn.Module):
    def __init__(self, backbone: Transformer, n_labels: int, dropout: float):
        super().__init__()
        self.backbone = backbone
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(backbone.cfg.d_model, n_labels)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(ids, mask)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        return self.classifier(self.drop(pooled))


def encode(texts: list[str], tokenizer: Tokenizer, cfg: ModelConfig, specials: dict[str, int], max_len: int) -> list[list[int]]:
    budget = min(max_len, cfg.max_seq_len) - (2 if cfg.arch == "encoder" else 1)
    out = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids = enc.ids[:budget]
        out.append(([specials["cls"]] if cfg.arch == "encoder" else []) + ids + [specials["sep"]])
    return out


def _batches(seqs: list[list[int]], labels: np.ndarray, batch_size: int, pad_id: int, rng: np.random.Generator | None):
    """Length-bucketed batches (little padding); shuffled when `rng` is given."""
    order = np.arange(len(seqs)) if rng is None else rng.permutation(len(seqs))
    chunks = [order[i : i + batch_size * 16] for i in range(0, len(order), batch_size * 16)]
    batches = []
    for chunk in chunks:
        chunk = sorted(chunk, key=lambda i: len(seqs[i]))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    for idx in batches:
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
        yield ids, ids != pad_id, torch.as_tensor(labels[idx]), idx


@torch.no_grad()
def predict(model: SequenceClassifier, seqs, labels, cfg: FinetuneConfig, pad_id: int, device) -> np.ndarray:
    model.eval()
    preds = np.zeros(len(seqs), dtype=np.int64)
    for ids, mask, _, idx in _batches(seqs, labels, cfg.batch_size * 2, pad_id, None):
        preds[idx] = model(ids.to(device), mask.to(device)).argmax(-1).cpu().numpy()
    model.train()
    return preds


def finetune(
    backbone: Transformer,
    tokenizer: Tokenizer,
    specials: dict[str, int],
    splits: dict[str, tuple[list[str], list[int]]],
    n_labels: int,
    cfg: FinetuneConfig,
    label: str = "finetune",
) -> dict:
    """Train on splits['train']; return per-epoch validation accuracy and the final predictions."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    mcfg, pad = backbone.cfg, backbone.cfg.pad_id
    data = {name: (encode(texts, tokenizer, mcfg, specials, cfg.max_len), np.asarray(labels))
            for name, (texts, labels) in splits.items()}
    model = SequenceClassifier(backbone, n_labels, cfg.dropout).to(device)
    n_train = len(data["train"][0])
    steps = cfg.epochs * -(-n_train // cfg.batch_size)
    optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay, device.type)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(int(cfg.warmup_ratio * steps), steps, 0.0))
    rng = np.random.default_rng(cfg.seed)
    curve = []
    with Progress(transient=True) as progress:
        bar = progress.add_task(label, total=steps)
        for epoch in range(1, cfg.epochs + 1):
            losses = []
            for ids, mask, y, _ in _batches(*data["train"], cfg.batch_size, pad, rng):
                loss = F.cross_entropy(model(ids.to(device), mask.to(device)), y.to(device))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                progress.update(bar, advance=1)
            val_pred = predict(model, *data["validation"], cfg, pad, device)
            curve.append({"epoch": epoch, "train_loss": float(np.mean(losses)),
                          "val_accuracy": float((val_pred == data["validation"][1]).mean())})
    return {
        "curve": curve,
        "predictions": {name: predict(model, seqs, labels, cfg, pad, device).tolist() for name, (seqs, labels) in data.items() if name != "train"},
        "labels": {name: labels.tolist() for name, (_, labels) in data.items() if name != "train"},
    }


def random_backbone(cfg: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg)
