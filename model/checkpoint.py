"""Atomic checkpoints: the training state under named keys, each file checksummed, a marker last.

A checkpoint folder holds `model.safetensors`, `config.json` (the resolved TrainConfig),
`train_state.json`, and for resumable checkpoints `optimizer.safetensors` + `optimizer.json`,
`lr_scheduler.json`, `dataloader.json` and `rng.safetensors`. Nothing is pickled. It is written
to a temporary folder, fsynced, renamed into place, and `COMPLETE` (a SHA-256 per file) is written
last: a folder without a valid marker is never loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from model.config import TrainConfig, read_train_config, to_dict

MARKER = "COMPLETE"
STEP_PREFIX = "step-"


class CheckpointError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
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


def _optimizer_files(optimizer: torch.optim.Optimizer | dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (safetensors) and plain data (JSON).

    `optimizer` may be the state dict itself: the full state that FSDP gathers for rank 0."""
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors, state = {}, {}
    for idx, entry in sd["state"].items():
        state[str(idx)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
                state[str(idx)][key] = {"tensor": f"{idx}.{key}"}
            else:
                state[str(idx)][key] = value
    return tensors, {"param_groups": sd["param_groups"], "state": state}


def read_optimizer_state(path: Path) -> dict:
    """The optimizer state dict of a checkpoint, in `optimizer.state_dict()`'s layout."""
    meta = json.loads((path / "optimizer.json").read_text())
    tensors = safetensors.torch.load_file(str(path / "optimizer.safetensors"))
    state = {int(idx): {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
                        for k, v in entry.items()}
             for idx, entry in meta["state"].items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state(generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if generator is not None:
        state["objective_generator"] = generator.get_state()
    if torch.cuda.is_available():
        state.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def restore_rng(state: dict[str, torch.Tensor], generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if generator is not None and "objective_generator" in state:
        generator.set_state(state["objective_generator"])
    cuda = [state[k] for k in sorted(k for k in state if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    cfg: TrainConfig,
    train_state: dict[str, Any],
    optimizer: torch.optim.Optimizer | dict | None = None,
    lr_scheduler: Any = None,
    dataloader: dict | None = None,
    rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write atomically; on a write error (full disk) the temporary folder is removed and the
    previous checkpoint at `path`, if any, is left as it was."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))  # handles tied weights
        (tmp / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        (tmp / "train_state.json").write_text(json.dumps(train_state, indent=2))
        if optimizer is not None:
            tensors, meta = _optimizer_files(optimizer)
            safetensors.torch.save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(meta))
        if lr_scheduler is not None:
            (tmp / "lr_scheduler.json").write_text(json.dumps(lr_scheduler.state_dict()))
        if dataloader is not None:
            (tmp / "dataloader.json").write_text(json.dumps(dataloader))
        if rng is not None:
            safetensors.torch.save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
        for p in tmp.iterdir():
            _fsync(p)
        seal(tmp)
        _fsync(tmp / MARKER)
        _fsync(tmp)
    except (OSError, safetensors.SafetensorError) as exc:  # safetensors reports a full disk as its own error
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(exc, "strerror", None) or str(exc)
        raise CheckpointError(f"could not write checkpoint {path}: {reason}; free disk space under "
                              f"{path.parent} and re-run to resume (earlier checkpoints are intact)") from None
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


def seal(folder: Path) -> None:
    """Write the marker: a SHA-256 of every other file in `folder`. Written last, it makes the folder a checkpoint."""
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.name != MARKER}
    (folder / MARKER).write_text(json.dumps(files, indent=2))


def verify(path: str | Path) -> None:
    path = Path(path)
    marker = path / MARKER
    if not marker.exists():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {MARKER} marker); it was not fully written")
    try:
        files = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path} is corrupted: its {MARKER} marker is not valid JSON") from None
    for name, digest in files.items():
        if not (path / name).exists() or sha256_file(path / name) != digest:
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} does not match its checksum")


def load_train_config(path: str | Path) -> TrainConfig:
    return read_train_config(Path(path) / "config.json")


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Weights from `model.safetensors` only: a pickle or any other format is refused, never executed."""
    try:
        safetensors.torch.load_model(model, str(Path(path) / "model.safetensors"), strict=True)
    except safetensors.SafetensorError as exc:
        raise CheckpointError(f"{path}/model.safetensors is not a valid safetensors file ({exc}); "
                              "weights are only read from safetensors") from None


def load_pretrained(path: str | Path) -> tuple[nn.Module, TrainConfig]:
    """The pretraining model (backbone + objective head) of a verified checkpoint."""
    from model.objectives import get_objective

    verify(path)
    cfg = load_train_config(path)
    model = get_objective(cfg.objective).build(cfg.model, cfg, cfg.specials)
    load_weights(model, path)
    return model, cfg


def load_optimizer_moments(path: Path, optimizer: torch.optim.Optimizer, load=None) -> bool:
    """AdamW's moments from a checkpoint, keeping the optimizer's own hyper-parameters; False if it has none.

    `load(state_dict)` puts the state in (default `optimizer.load_state_dict`; a sharded optimizer's differs)."""
    if not (path / "optimizer.json").exists():
        return False
    own = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    (load or optimizer.load_state_dict)(read_optimizer_state(path))
    for group, settings in zip(optimizer.param_groups, own):
        group.update(settings)
    return True


def read_training_state(path: Path) -> dict:
    """Everything a resumable checkpoint holds besides the weights, as plain state dicts."""
    return {
        "optimizer": read_optimizer_state(path),
        "lr_scheduler": json.loads((path / "lr_scheduler.json").read_text()),
        "train_state": json.loads((path / "train_state.json").read_text()),
        "dataloader": json.loads((path / "dataloader.json").read_text()),
        "rng": safetensors.torch.load_file(str(path / "rng.safetensors")),
    }


def load_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any) -> dict:
    """Restore model, optimizer and LR schedule in place; return train_state, dataloader and rng."""
    load_weights(model, path)
    restored = read_training_state(path)
    optimizer.load_state_dict(restored["optimizer"])
    lr_scheduler.load_state_dict(restored["lr_scheduler"])
    return restored


class CheckpointManager:
    """Resumable checkpoints in `<root>/step-NNNNNNN`: find the newest valid one, keep the last K and the best."""

    def __init__(self, root: str | Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = max(1, keep_last)
        self._written: set[Path] = set()  # saved by this process: known whole, not hashed again

    def path_for(self, step: int) -> Path:
        return self.root / f"{STEP_PREFIX}{step:07d}"

    def save(self, step: int, model: nn.Module, cfg: TrainConfig, train_state: dict, optimizer, lr_scheduler,
             dataloader: dict, rng: dict[str, torch.Tensor]) -> Path:
        """A resumable checkpoint for `step`, then retention."""
        path = save_checkpoint(self.path_for(step), model, cfg, train_state, optimizer, lr_scheduler, dataloader, rng)
        self._written.add(path)
        self.prune()
        return path

    def steps(self) -> list[Path]:
        if not self.root.exists():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))

    def valid(self, warn: bool = False) -> list[Path]:
        out = []
        for p in self.steps():
            try:
                if p not in self._written:
                    verify(p)
                out.append(p)
            except CheckpointError as exc:
                if warn:
                    warnings.warn(f"{exc}; skipping it", stacklevel=2)
        return out

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies; corrupted or half-written newer ones are skipped with a warning."""
        valid = self.valid(warn=True)
        return valid[-1] if valid else None

    def prune(self) -> list[Path]:
        """Delete all but the last `keep_last` valid checkpoints and the best (lowest val loss) one.

        Invalid folders older than the newest valid checkpoint are debris of interrupted saves and go too;
        the only valid checkpoint is never deleted.
        """
        valid = self.valid()
        if not valid:
            return []
        keep = set(valid[-self.keep_last:])
        scored = [(json.loads((p / "train_state.json").read_text()).get("val_loss"), p) for p in valid]
        scored = [(v, p) for v, p in scored if v is not None]
        if scored:
            keep.add(min(scored, key=lambda vp: vp[0])[1])
        removed = [p for p in self.steps() if p not in keep and p.name < valid[-1].name]
        for p in removed:
            shutil.rmtree(p, ignore_errors=True)
        return removed
