"""Atomic checkpoints: safetensors weights + the resolved config + train state, marker written last.

Written to a temporary folder, fsynced, then renamed into place; a folder without a valid
`COMPLETE` marker (which lists a SHA-256 per file) is never loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import nn

from model.config import TrainConfig, read_train_config, to_dict

MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, model: nn.Module, cfg: TrainConfig, train_state: dict[str, Any]) -> Path:
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    safetensors.torch.save_model(model, str(tmp / "model.safetensors"))  # handles tied weights
    (tmp / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    (tmp / "train_state.json").write_text(json.dumps(train_state, indent=2))
    files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
    for p in tmp.iterdir():
        _fsync(p)
    (tmp / MARKER).write_text(json.dumps(files, indent=2))
    _fsync(tmp / MARKER)
    _fsync(tmp)
    if path.exists():
        old = path.parent / f".{path.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)
    _fsync(path.parent)
    return path


def verify(path: str | Path) -> None:
    path = Path(path)
    marker = path / MARKER
    if not marker.exists():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {MARKER} marker); it was not fully written")
    for name, digest in json.loads(marker.read_text()).items():
        if not (path / name).exists() or _sha256(path / name) != digest:
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} does not match its checksum")


def load_train_config(path: str | Path) -> TrainConfig:
    return read_train_config(Path(path) / "config.json")


def load_pretrained(path: str | Path) -> tuple[nn.Module, TrainConfig]:
    """The pretraining model (backbone + objective head) of a verified checkpoint."""
    from model.objectives import get_objective

    verify(path)
    cfg = load_train_config(path)
    model = get_objective(cfg.objective).build(cfg.model, cfg, cfg.specials)
    missing, unexpected = safetensors.torch.load_model(model, str(Path(path) / "model.safetensors"), strict=True)
    return model, cfg

