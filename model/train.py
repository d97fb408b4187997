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
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from model.checkpoint import save_checkpoint
from model.config import ConfigError, TrainConfig, read_train_config
from model.data import RowLoader, eval_batches, load_rows
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
    out["val/perplexity"] = math.exp(min(out["val/loss"], 50.0))
    return out


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
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    )
    train_rows, val_rows = load_rows(cfg.data_dir, "train"), load_rows(cfg.data_dir, "validation")
    loader = RowLoader(train_rows, cfg.batch_size, cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    tokens_per_step = cfg.batch_size * train_rows.shape[1]
    flops_per_step = model.flops_per_token(train_rows.shape[1]) * tokens_per_step

    metrics_file = open(out_dir / "metrics.jsonl", "w", buffering=1)

    def emit(step: int, values: dict[str, float]) -> None:
        metrics_file.write(json.dumps({"step": step, **values}) + "\n")

    progress = Progress(
        TextColumn(f"[bold]pretrain {cfg.objective}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"), TimeRemainingColumn(),
        console=console, transient=False,
    )
    started = time.perf_counter()
    window_start, window_steps = started, 0
    last: dict[str, float] = {}
    with progress:
        bar = progress.add_task("train", total=cfg.max_steps, loss="-", tps="-")
        for step in range(1, cfg.max_steps + 1):
            batch = loader.next_batch().to(device, non_blocking=True)
            with amp():
                loss, _ = step_fn(batch, gen)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window_steps += 1
            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                loss_value = loss.item()  # the only host-device sync, every log_interval steps
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"non-finite training loss at step {step}; lower train.lr")
                now = time.perf_counter()
                tps = window_steps * tokens_per_step / (now - window_start)
                window_start, window_steps = now, 0
                emit(step, {"train/loss": loss_value, "train/lr": scheduler.get_last_lr()[0],
                            "throughput/tokens_per_s": tps})
                progress.update(bar, loss=f"{loss_value:.3f}", tps=f"{tps:,.0f}")
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                last = evaluate(model, val_rows, cfg, device, amp)
                emit(step, last)
            progress.update(bar, advance=1)
    elapsed = time.perf_counter() - started
    metrics_file.close()

    state = {"step": cfg.max_steps, "epoch": loader.state.epoch, "position": loader.state.position,
             "tokens_seen": cfg.max_steps * tokens_per_step}
    save_checkpoint(out_dir / "checkpoint", model, cfg, state)
    summary = {
        **last,
        "tokens_seen": state["tokens_seen"],
        "pretrain_flops": flops_per_step * cfg.max_steps,
        "n_params": sum(p.numel() for p in model.parameters()),
        "train_seconds": elapsed,
        "throughput/tokens_per_s": state["tokens_seen"] / elapsed,
        "device": str(device),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="resolved training config (JSON)")
    args = parser.parse_args(argv)
    try:
        cfg = read_train_config(args.config)
        summary = train(cfg)
    except (ConfigError, FileNotFoundError, ValueError, FloatingPointError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    console.print(f"done: val/loss={summary.get('val/loss', float('nan')):.4f} "
                  f"tokens/s={summary['throughput/tokens_per_s']:,.0f} -> {cfg.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
