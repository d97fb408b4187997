"""Downstream evaluation: fine-tune a pretrained (or random) backbone, score with scikit-learn."""
from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from prefect import task
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from tokenizers import Tokenizer

from model.checkpoint import MARKER, load_pretrained, sha256_file
from model.config import ModelConfig, load_dataclass
from model.finetune import FinetuneConfig, finetune, random_backbone
from tasks.caching import stage_cache_key
from warehouse.store import SPLITS, task_split


def classification_metrics(labels, predictions) -> dict[str, float]:
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, predictions)),
    }


class FeatureCache:
    """The probe's frozen features of the last few backbones, shared by the cells of this process:
    every learning rate and seed of a probe over one pretrained model reads the same features."""

    def __init__(self, size: int = 2):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key: str):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        return None

    def put(self, key: str, features) -> None:
        with self.lock:
            self.items[key] = features
            while len(self.items) > self.size:
                self.items.popitem(last=False)

    def __reduce__(self):
        # A task shipped to another process (a Dask worker) carries its function by value, globals
        # included: there it is this module's FEATURES, that process's own cache, not a copy of a lock.
        return "FEATURES"


FEATURES = FeatureCache()


def feature_key(weights: dict, tokenizer_path: str, max_len: int, splits: dict) -> str:
    h = hashlib.sha256(json.dumps([weights, tokenizer_path, max_len], sort_keys=True, default=str).encode())
    for name in sorted(splits):
        for item in splits[name][0] + (splits[name][2] or []):
            h.update(item.encode())
    return h.hexdigest()


# `variant` is a label and `num_threads` a share of the machine: neither changes the result.
@task(name="finetune", task_run_name="finetune-{variant}-s{seed}",
      cache_key_fn=stage_cache_key("model", "warehouse", exclude=("variant", "num_threads")),
      persist_result=True, result_serializer="json")
def finetune_downstream(db_path: str, task_name: str, labels: list[str], tokenizer_path: str, specials: dict,
                        finetune_config: dict, seed: int, checkpoint: str | None = None,
                        checkpoint_digest: str = "", random_model: dict | None = None, variant: str = "",
                        num_threads: int = 0) -> dict:
    """Exactly one of `checkpoint` (a pretrained model) or `random_model` (a ModelConfig: the floor).

    `checkpoint_digest` (the checkpoint's checksum marker) keys the cache on the weights themselves,
    not only on the folder they were written to.
    """
    if checkpoint:
        backbone = load_pretrained(checkpoint)[0].backbone
    else:
        backbone = random_backbone(load_dataclass(ModelConfig, random_model), seed)
    index = {label: i for i, label in enumerate(labels)}
    splits = {}
    for split in SPLITS:
        texts, pairs, names = task_split(db_path, task_name, split)
        if not texts:
            raise ValueError(f"downstream task {task_name!r} has an empty {split} split; lower downstream.n_classes "
                             "or raise downstream.val_frac / test_frac")
        splits[split] = (texts, [index[n] for n in names], pairs)
    cfg = load_dataclass(FinetuneConfig, {**finetune_config, "seed": seed, "num_threads": num_threads})
    key = None
    if cfg.method == "probe":  # a random backbone's weights depend on the seed; a checkpoint's do not
        weights = ({"checkpoint": checkpoint_digest or sha256_file(Path(checkpoint) / MARKER)} if checkpoint
                   else {"random": random_model, "seed": seed})
        key = feature_key(weights, tokenizer_path, cfg.max_len, splits)
    out = finetune(backbone, Tokenizer.from_file(tokenizer_path), specials, splits, len(labels), cfg,
                   label=f"finetune {variant} seed {seed}", features=FEATURES.get(key) if key else None)
    if key:
        FEATURES.put(key, out.pop("features"))
    scores = {split: classification_metrics(out["labels"][split], out["predictions"][split])
              for split in ("validation", "test")}
    confusion = np.zeros((len(labels), len(labels)), dtype=int)
    for y, p in zip(out["labels"]["test"], out["predictions"]["test"]):
        confusion[y, p] += 1
    return {"seed": seed, "method": cfg.method, "scores": scores, "curve": out["curve"], "info": out["info"],
            "confusion": confusion.tolist(), "outputs": []}
