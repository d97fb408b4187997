"""Pretraining entry point: `python -m model.train --config run/train_config.json`.

Reads example rows made by the objective, trains, evaluates on the validation rows, and writes
into `out_dir`: `metrics.jsonl` (streamed, one JSON object per log / eval step), `summary.json`,
and an atomic checkpoint in `checkpoint/`. Knows nothing of Prefect or MLflow: a supervisor
tails `metrics.jsonl`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from model.checkpoint import (CheckpointError, CheckpointManager, load_optimizer_moments, load_train_config,
                              load_training_state, load_weights, restore_rng, rng_state, save_checkpoint, verify)
from model.config import ConfigError, TrainConfig, read_train_config
from model.data import LoaderState, RowLoader, eval_batches, load_rows
from model.objectives import get_objective
from model.transformer import configure_optimizer, cosine_schedule

console = Console(stderr=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; set device: auto or cpu")
    return torch.device(name)


def autocast_for(cfg: TrainConfig, device: torch.device):
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if bf16:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


@torch.no_grad()
def evaluate(model, rows, cfg: TrainConfig, device: torch.device, amp) -> dict[str, float]:
    """Mean loss and objective statistics over the same validation rows and masks every time."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(1234)
    total_loss, total_n, stats_sum = 0.0, 0, {}
    for batch in eval_batches(rows, cfg.batch_size, cfg.eval_batches):
        with amp():
            loss, stats = model(batch.to(device), gen)
        n = int(stats["n_predicted"])
        total_loss += loss.item() * n
        total_n += n
        for k, v in stats.items():
            if k != "n_predicted":
                stats_sum[k] = stats_sum.get(k, 0.0) + float(v) * n
    model.train()
    if total_n == 0:
        raise ValueError("the validation split has no examples; use a larger corpus or a shorter train.seq_len")
    out = {"val/loss": total_loss / total_n, **{f"val/{k}": v / total_n for k, v in stats_sum.items()}}
    if getattr(model, "loss_is_token_cross_entropy", True):  # a perplexity of ELECTRA's L_gen + 50 L_disc means nothing
        out["val/perplexity"] = math.exp(min(out["val/loss"], 50.0))
    return out


class Stopped(Exception):
    """SIGTERM arrived: the run saved a checkpoint at `step` and ends so that it can be resumed."""

    def __init__(self, step: int):
        super().__init__(f"stopped by SIGTERM at step {step}; a checkpoint is saved, re-run the same command to resume")
        self.step = step


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks between steps (a plain bool: no device sync)."""

    def __init__(self):
        self.raised = False

    def __enter__(self):
        in_main_thread = threading.current_thread() is threading.main_thread()  # signals can only be set there
        self.previous = signal.signal(signal.SIGTERM, self._handle) if in_main_thread else None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _raise_if_nonfinite(bad_step: torch.Tensor) -> None:
    step = int(bad_step)  # a host-device sync: called every log_interval steps and before saves only
    if step >= 0:
        raise FloatingPointError(f"non-finite loss at step {step}; lower train.lr or set train.nonfinite=skip")


def total_steps(cfg: TrainConfig, flops_per_step: float) -> int:
    """max_steps, or as many steps as fit in the FLOP budget when train.max_flops is set."""
    if cfg.max_flops <= 0:
        return cfg.max_steps
    steps = int(cfg.max_flops // flops_per_step)
    if steps < 1:
        raise ConfigError(f"train.max_flops={cfg.max_flops:.3g} is less than one step ({flops_per_step:.3g} FLOPs); "
                          "raise it or use a smaller model / batch")
    return steps


def _check_resumable(saved: TrainConfig, cfg: TrainConfig, path: Path) -> None:
    """Resuming is exact only with the same model, objective and data shapes; refuse anything else."""
    for key in ("objective", "model", "data_dir", "seq_len", "batch_size", "grad_accum_steps", "seed", "lr",
                "warmup_steps", "max_steps", "max_flops", "min_lr_ratio", "weight_decay", "mask_prob",
                "whole_word", "static_masking", "static_copies", "noise_density", "mean_span", "generator_ratio",
                "init_from", "init_optimizer"):
        if getattr(saved, key) != getattr(cfg, key):
            raise ConfigError(f"checkpoint {path} was made with {key}={getattr(saved, key)!r}, this run has "
                              f"{getattr(cfg, key)!r}; use another out_dir or set resume: false")


def start_from(cfg: TrainConfig, model, optimizer) -> dict:
    """Continual pretraining: load a finished run's weights (and AdamW moments) and return where it stopped.

    Only the moments are taken from the old optimizer; learning rate and weight decay are this run's.
    """
    path = Path(cfg.init_from)
    if not path.is_dir():
        raise ConfigError(f"train.init_from={path} is not a folder; point it at a checkpoint folder of an earlier run")
    verify(path)
    saved = load_train_config(path)
    for key in ("objective", "model", "specials"):
        if getattr(saved, key) != getattr(cfg, key):
            raise ConfigError(f"train.init_from={path} was trained with {key}={getattr(saved, key)!r}, this run has "
                              f"{getattr(cfg, key)!r}; continue with the same objective, model and tokenizer")
    load_weights(model, path)
    restored_moments = cfg.init_optimizer == "restore" and load_optimizer_moments(path, optimizer)
    state = json.loads((path / "train_state.json").read_text())
    return {"from": str(path), "step": state["step"], "tokens_seen": state["tokens_seen"], "flops": state["flops"],
            "optimizer": "restored" if restored_moments else "fresh"}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows logged after the resumed step: the resumed run logs them again."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):  # the half-written line of a killed run
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)  # a new file: a supervisor tailing the old one notices and starts over


def train(cfg: TrainConfig) -> dict:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = autocast_for(cfg, device)

    objective = get_objective(cfg.objective)
    model = objective.build(cfg.model, cfg, cfg.specials).to(device)
    step_fn = model
    if cfg.compile == "true" or (cfg.compile == "auto" and device.type == "cuda"):
        step_fn = torch.compile(model)
    optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay, device.type)
    train_rows, val_rows = load_rows(cfg.data_dir, "train"), load_rows(cfg.data_dir, "validation")
    loader = RowLoader(train_rows, cfg.batch_size, cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * cfg.seq_len
    flops_per_step = model.flops_per_token(cfg.seq_len) * tokens_per_step
    max_steps = total_steps(cfg, flops_per_step)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(cfg.warmup_steps, max_steps, cfg.min_lr_ratio)
    )

    checkpoints = CheckpointManager(out_dir / "checkpoints", cfg.keep_checkpoints)
    start_step, skipped, last = 0, 0, {}
    init = {"from": "", "step": 0, "tokens_seen": 0, "flops": 0.0, "optimizer": ""}  # what this run continues
    resume_from = checkpoints.latest()
    if resume_from is not None and not cfg.resume:
        raise ConfigError(f"{out_dir} already holds checkpoints ({resume_from.name}); set resume: true to continue "
                          "from them or choose another out_dir")
    if resume_from is not None:
        _check_resumable(load_train_config(resume_from), cfg, resume_from)
        restored = load_training_state(resume_from, model, optimizer, scheduler)
        loader.state = LoaderState(**restored["dataloader"])
        restore_rng(restored["rng"], gen)
        init = restored["train_state"].get("init", init)
        start_step = restored["train_state"]["step"] - init["step"]
        skipped = restored["train_state"].get("skipped_steps", 0)
        last = restored["train_state"].get("last_eval", {})
        _truncate_metrics(out_dir / "metrics.jsonl", init["step"] + start_step)
        console.print(f"resuming from {resume_from} (step {init['step'] + start_step})")
    elif cfg.init_from:
        init = start_from(cfg, model, optimizer)
        console.print(f"continuing from {init['from']} (step {init['step']}, optimizer {init['optimizer']})")
    metrics_file = open(out_dir / "metrics.jsonl", "a" if resume_from else "w", buffering=1)

    # Steps below count from this run's start; what is written (metrics, checkpoints, summary) counts on
    # from the model it continues, so a continual series reads as one curve.
    def emit(step: int, values: dict[str, float]) -> None:
        metrics_file.write(json.dumps({"step": init["step"] + step, **values}) + "\n")

    def train_state(step: int) -> dict:
        return {"step": init["step"] + step, "tokens_seen": init["tokens_seen"] + step * tokens_per_step,
                "flops": init["flops"] + step * flops_per_step, "skipped_steps": skipped,
                "epoch": loader.state.epoch, "position": loader.state.position, "last_eval": last,
                "val_loss": last.get("val/loss") if last.get("step") == step else None, "init": init}

    def checkpoint(step: int) -> None:
        _raise_if_nonfinite(bad_step)  # never write weights that a non-finite step has touched
        checkpoints.save(init["step"] + step, model, cfg, train_state(step), optimizer, scheduler,
                         asdict(loader.state), rng_state(gen))

    progress = Progress(
        TextColumn(f"[bold]pretrain {cfg.objective}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"), TimeRemainingColumn(),
        console=console, transient=False,
    )
    interval = cfg.checkpoint_interval or cfg.eval_interval
    bad_step = torch.tensor(-1, device=device)  # first step with a non-finite loss, kept on the device
    started = time.perf_counter()
    window_start, window_steps = started, 0
    with progress, _SigtermFlag() as sigterm:
        bar = progress.add_task("train", total=max_steps, completed=start_step, loss="-", tps="-")
        for step in range(start_step + 1, max_steps + 1):
            for _ in range(cfg.grad_accum_steps):
                batch = loader.next_batch().to(device, non_blocking=True)
                with amp():
                    loss, _ = step_fn(batch, gen)
                (loss / cfg.grad_accum_steps).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
            if cfg.nonfinite == "skip" and not bool(finite):  # the one per-step sync, only under `skip`
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
                emit(step, {"train/skipped_nonfinite": 1.0})
            else:
                bad_step = torch.where(~finite & (bad_step < 0), torch.tensor(step, device=device), bad_step)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            window_steps += 1
            if step % cfg.log_interval == 0 or step == max_steps:
                _raise_if_nonfinite(bad_step)
                loss_value = loss.item()
                now = time.perf_counter()
                tps = window_steps * tokens_per_step / (now - window_start)
                window_start, window_steps = now, 0
                emit(step, {"train/loss": loss_value, "train/lr": scheduler.get_last_lr()[0],
                            "throughput/tokens_per_s": tps, "train/flops": init["flops"] + step * flops_per_step})
                progress.update(bar, loss=f"{loss_value:.3f}", tps=f"{tps:,.0f}")
            if step % cfg.eval_interval == 0 or step == max_steps:
                last = {"step": step, **evaluate(model, val_rows, cfg, device, amp)}
                emit(step, {**{k: v for k, v in last.items() if k != "step"},
                            "train/flops": init["flops"] + step * flops_per_step})
            if step % interval == 0 or step == max_steps:
                checkpoint(step)
            progress.update(bar, advance=1)
            if sigterm.raised:
                if step % interval and step != max_steps:
                    checkpoint(step)
                metrics_file.close()
                raise Stopped(step)
    elapsed = time.perf_counter() - started
    metrics_file.close()
    if not last:  # resumed a run that had already finished
        last = {"step": max_steps, **evaluate(model, val_rows, cfg, device, amp)}

    state = train_state(max_steps)
    save_checkpoint(out_dir / "checkpoint", model, cfg, state)
    trained_steps = max_steps - start_step
    summary = {
        **{k: v for k, v in last.items() if k != "step"},
        "tokens_seen": state["tokens_seen"],
        "pretrain_flops": state["flops"],
        "flops_per_token": flops_per_step / tokens_per_step,
        "steps": state["step"],
        "run_steps": max_steps,
        "init_from": init["from"],
        "init_step": init["step"],
        "n_params": sum(p.numel() for p in model.parameters()),
        "train_seconds": elapsed,
        "throughput/tokens_per_s": trained_steps * tokens_per_step / elapsed if trained_steps else 0.0,
        "device": str(device),
        "resumed_from_step": start_step,
        "skipped_steps": skipped,
    }
    earlier = out_dir / "summary.json"
    if not trained_steps and earlier.exists():  # nothing left to train: keep the speed the run was trained at
        before = json.loads(earlier.read_text())
        summary.update({k: before[k] for k in ("throughput/tokens_per_s", "train_seconds") if k in before})
    earlier.write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="resolved training config (JSON)")
    args = parser.parse_args(argv)
    try:
        cfg = read_train_config(args.config)
        summary = train(cfg)
    except Stopped as exc:
        console.print(f"[yellow]{exc}[/yellow]")
        return 128 + signal.SIGTERM
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, FloatingPointError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    console.print(f"done: val/loss={summary.get('val/loss', float('nan')):.4f} "
                  f"tokens/s={summary['throughput/tokens_per_s']:,.0f} -> {cfg.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
