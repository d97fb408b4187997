"""Pretraining entry point: `python -m model.train --config run/train_config.json`.

Reads example rows made by the objective, trains, evaluates on the validation rows, and writes
into `out_dir`: `metrics.jsonl` (streamed, one JSON object per log / eval step), `summary.json`,
and an atomic checkpoint in `checkpoint/`. Knows nothing of Prefect or MLflow: a supervisor
tails `metrics.jsonl`.

Runs unchanged under `torchrun` (one process per device, see model/distributed.py): `batch_size`
stays the global batch and each process trains on its slice of it; only rank 0 writes metrics,
checkpoints and the summary, and the data position saved is global, so a run saved with N
processes resumes with M at the same place in the data.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, record

from model import distributed
from model.checkpoint import (CheckpointError, CheckpointManager, load_optimizer_moments, load_train_config,
                              load_weights, read_training_state, restore_rng, rng_state, save_checkpoint, verify)
from model.config import ConfigError, TrainConfig, read_train_config
from model.data import LoaderState, RowLoader, eval_batches, load_rows, row_window, shard_bounds
from model.distributed import World
from model.objectives import get_objective
from model.transformer import configure_optimizer, cosine_schedule, enable_activation_checkpointing

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


# Dense bf16 tensor-core peak of one device, TFLOP/s (vendor datasheets, without sparsity). Matched
# as substrings of `torch.cuda.get_device_name()`, first match wins: the more specific names first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
)


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """FLOP/s one device can do at most (the MFU denominator): the override, else the table entry for
    the GPU's name; None when neither applies (the CPU, an unlisted GPU), and then no MFU is logged."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS if key in name), None)


def mfu(flops_per_s: float, peak: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation: the FLOPs the model's accounting says a step needs, per second, over the
    peak of all devices."""
    return flops_per_s / (peak * devices) if peak else None


class LossWindow:
    """The training loss summed on the device between two logs, read once per log_interval.

    Adding is a device-side add, so the host never waits for the device; the caller reads `mean()`
    (the one host-device sync) every log_interval steps and resets the window.
    """

    def __init__(self):
        self.total, self.count = None, 0

    def add(self, loss: torch.Tensor, micro_batches: int = 1) -> None:
        """`loss`: the sum of `micro_batches` micro-batch losses."""
        loss = loss.detach().float()
        self.total = loss if self.total is None else self.total + loss
        self.count += micro_batches

    def mean(self) -> torch.Tensor | None:
        """The mean as a device tensor (no sync); None when nothing was added (every step skipped)."""
        return None if self.total is None else self.total / self.count

    def reset(self) -> None:
        self.total, self.count = None, 0


@torch.no_grad()
def evaluate(model, rows, cfg: TrainConfig, device: torch.device, amp, world: World = World()) -> dict[str, float]:
    """Mean loss and objective statistics over the same validation rows and masks every time.

    With several processes each one evaluates its slice of every batch (drawing the masks of the
    whole batch, as in training) and the token-weighted sums are added up: the same numbers as one
    process, up to float rounding.
    """
    model.eval()
    gen = torch.Generator(device=device).manual_seed(1234)
    total_loss, total_n, stats_sum = 0.0, 0, {}
    for batch in eval_batches(rows, cfg.batch_size, cfg.eval_batches):
        start, stop = shard_bounds(len(batch), world.rank, world.size)
        if stop == start:  # a last batch with fewer rows than processes: FSDP needs every process in every forward
            start, stop = 0, 1
        with amp(), row_window(start, stop, len(batch)):
            loss, stats = model(batch[start:stop].to(device), gen)
        n = int(stats["n_predicted"]) if (start, stop) == shard_bounds(len(batch), world.rank, world.size) else 0
        if not n:  # nothing predicted here (or the stand-in row above): adds nothing, not 0 * NaN
            stats_sum.update({k: stats_sum.get(k, 0.0) for k in stats if k != "n_predicted"})
            continue
        total_loss += loss.item() * n
        total_n += n
        for k, v in stats.items():
            if k != "n_predicted":
                stats_sum[k] = stats_sum.get(k, 0.0) + float(v) * n
    model.train()
    if world.distributed:
        keys = sorted(stats_sum)
        sums = distributed.sum_(torch.tensor([total_loss, total_n, *(stats_sum[k] for k in keys)],
                                             dtype=torch.float64, device=device), world).tolist()
        total_loss, total_n, stats_sum = sums[0], int(sums[1]), dict(zip(keys, sums[2:]))
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
    """Resuming is exact only with the same model, objective and data shapes; refuse anything else.

    Launch settings (nproc_per_node, nnodes, rdzv_endpoint, parallelism, activation_checkpointing)
    are not compared: the batch is global and the data position counts global samples, so a run
    saved with N processes continues with M.
    """
    for key in ("objective", "model", "data_dir", "seq_len", "batch_size", "grad_accum_steps", "seed", "lr",
                "warmup_steps", "max_steps", "max_flops", "min_lr_ratio", "weight_decay", "mask_prob",
                "whole_word", "static_masking", "static_copies", "noise_density", "mean_span", "generator_ratio",
                "init_from", "init_optimizer"):
        if getattr(saved, key) != getattr(cfg, key):
            raise ConfigError(f"checkpoint {path} was made with {key}={getattr(saved, key)!r}, this run has "
                              f"{getattr(cfg, key)!r}; use another out_dir or set resume: false")


def start_from(cfg: TrainConfig, model) -> dict:
    """Continual pretraining: load a finished run's weights and return where it stopped.

    Its AdamW moments are loaded later (`_restore_moments`), once the optimizer exists.
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
    state = json.loads((path / "train_state.json").read_text())
    return {"from": str(path), "step": state["step"], "tokens_seen": state["tokens_seen"], "flops": state["flops"],
            "optimizer": ""}


def _restore_moments(cfg: TrainConfig, init: dict, optimizer, load_optimizer) -> None:
    """Only the moments are taken from the old optimizer; learning rate and weight decay are this run's."""
    restored = cfg.init_optimizer == "restore" and load_optimizer_moments(Path(init["from"]), optimizer, load_optimizer)
    init["optimizer"] = "restored" if restored else "fresh"


def _injected_failure() -> str:
    """Test hook: PRETRAIN_FAIL_AT=<rank>:<step> makes that process raise at that step, as a crashing
    rank would (tests/test_distributed.py checks the supervisor reports its error). Unset: nothing."""
    return os.environ.get("PRETRAIN_FAIL_AT", "")


def _seed_dropout(cfg: TrainConfig, world: World, step: int) -> None:
    """Processes other than rank 0 hold other rows, so they draw their own dropout masks. Rank 0 keeps
    the one-process stream, so a one-process run is unchanged. Only rank 0's RNG is checkpointed; on
    resume the others re-derive theirs from the step."""
    if world.rank:
        torch.manual_seed(cfg.seed + 1_000_003 * world.rank + step)


def _state_replica(cfg: TrainConfig) -> torch.nn.Module:
    """An unsharded CPU copy of the model (no initialisation: built on the meta device) that rank 0
    fills with FSDP's gathered state to save it in the one-process format (tied weights included)."""
    with torch.device("meta"):
        replica = get_objective(cfg.objective).build(cfg.model, cfg, cfg.specials)
    return replica.to_empty(device="cpu")


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
    """Train as one process, or as one of several under torchrun (the process group lives for this call)."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    world, device = distributed.setup(resolve_device(cfg.device))
    try:
        return _train(cfg, world, device)
    finally:
        distributed.teardown()


def _train(cfg: TrainConfig, world: World, device: torch.device) -> dict:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = console.print if world.main else (lambda *a, **k: None)  # one voice, not one per process
    torch.manual_seed(cfg.seed)  # the same on every process: the same initial weights
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = autocast_for(cfg, device)

    objective = get_objective(cfg.objective)
    model = objective.build(cfg.model, cfg, cfg.specials).to(device)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    train_rows, val_rows = load_rows(cfg.data_dir, "train"), load_rows(cfg.data_dir, "validation")
    loader = RowLoader(train_rows, cfg.batch_size, cfg.seed, rank=world.rank, world=world.size,
                       pin_memory=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(cfg.seed)  # the same on every process (see data.row_window)
    tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * cfg.seq_len  # global
    flops_per_step = model.flops_per_token(cfg.seq_len) * tokens_per_step
    max_steps = total_steps(cfg, flops_per_step)
    peak = peak_flops(device, cfg.peak_tflops)

    checkpoints = CheckpointManager(out_dir / "checkpoints", cfg.keep_checkpoints)
    start_step, skipped, last = 0, 0, {}
    init = {"from": "", "step": 0, "tokens_seen": 0, "flops": 0.0, "optimizer": ""}  # what this run continues
    resume_from = checkpoints.latest()  # every process reads out_dir (shared storage across nodes)
    if resume_from is not None and not cfg.resume:
        raise ConfigError(f"{out_dir} already holds checkpoints ({resume_from.name}); set resume: true to continue "
                          "from them or choose another out_dir")
    # Weights are loaded before wrapping: every process loads the same full tensors, which DDP keeps
    # and FSDP shards; the optimizer state follows once the (possibly sharded) optimizer exists.
    if resume_from is not None:
        _check_resumable(load_train_config(resume_from), cfg, resume_from)
        load_weights(model, resume_from)
    elif cfg.init_from:
        init = start_from(cfg, model)

    sharded = world.distributed and cfg.parallelism == "fsdp"
    # nsp / sop with the MLM off never use the MLM head: DDP must then look for unused parameters.
    unused = cfg.objective in ("nsp", "sop") and cfg.mlm_weight == 0
    wrapped = distributed.wrap(model, world, cfg.parallelism, device, find_unused_parameters=unused)
    step_fn = wrapped
    if cfg.compile == "true" or (cfg.compile == "auto" and device.type == "cuda"):
        step_fn = torch.compile(wrapped)
    optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay, device.type)
    load_optimizer = (lambda sd: distributed.load_full_optimizer_state(model, optimizer, sd)) if sharded \
        else optimizer.load_state_dict
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(cfg.warmup_steps, max_steps, cfg.min_lr_ratio)
    )
    if resume_from is not None:
        restored = read_training_state(resume_from)
        load_optimizer(restored["optimizer"])
        scheduler.load_state_dict(restored["lr_scheduler"])
        loader.state = LoaderState(**restored["dataloader"])  # global samples: valid for any number of processes
        restore_rng(restored["rng"], gen)
        init = restored["train_state"].get("init", init)
        start_step = restored["train_state"]["step"] - init["step"]
        skipped = restored["train_state"].get("skipped_steps", 0)
        last = restored["train_state"].get("last_eval", {})
        if world.main:
            _truncate_metrics(out_dir / "metrics.jsonl", init["step"] + start_step)
        say(f"resuming from {resume_from} (step {init['step'] + start_step})")
    elif cfg.init_from:
        _restore_moments(cfg, init, optimizer, load_optimizer)
        say(f"continuing from {init['from']} (step {init['step']}, optimizer {init['optimizer']})")
    _seed_dropout(cfg, world, start_step)
    if world.distributed:
        say(f"{world.size} processes ({cfg.parallelism}), {cfg.batch_size // world.size} rows each per micro-batch")
    metrics_file = open(out_dir / "metrics.jsonl", "a" if resume_from else "w", buffering=1) if world.main else None

    # Steps below count from this run's start; what is written (metrics, checkpoints, summary) counts on
    # from the model it continues, so a continual series reads as one curve.
    def emit(step: int, values: dict[str, float]) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps({"step": init["step"] + step, **values}) + "\n")

    def train_state(step: int) -> dict:
        return {"step": init["step"] + step, "tokens_seen": init["tokens_seen"] + step * tokens_per_step,
                "flops": init["flops"] + step * flops_per_step, "skipped_steps": skipped,
                "epoch": loader.state.epoch, "position": loader.state.position, "last_eval": last,
                "val_loss": last.get("val/loss") if last.get("step") == step else None, "init": init}

    replica = _state_replica(cfg) if sharded and world.main else None

    def saved_state(with_optimizer: bool = True):
        """(module, optimizer or its state) to save: the model itself, or under FSDP the full state
        gathered to rank 0 (a collective: every process calls it)."""
        if not sharded:
            return model, optimizer
        weights = distributed.full_model_state(model)
        optim = distributed.full_optimizer_state(model, optimizer) if with_optimizer else None
        if replica is not None:
            replica.load_state_dict(weights)
        return replica, optim

    def checkpoint(step: int) -> None:
        _raise_if_nonfinite(bad_step)  # never write weights that a non-finite step has touched
        module, optim = saved_state()
        if world.main:
            checkpoints.save(init["step"] + step, module, cfg, train_state(step), optim, scheduler,
                             asdict(loader.state), rng_state(gen))
        distributed.barrier()  # the others wait: a checkpoint is whole before any process moves on or exits

    def close_metrics() -> None:
        if metrics_file is not None:
            metrics_file.close()

    progress = Progress(
        TextColumn(f"[bold]pretrain {cfg.objective}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"), TimeRemainingColumn(),
        console=console, transient=False, disable=not world.main,
    )
    interval = cfg.checkpoint_interval or cfg.eval_interval
    # Objectives whose loss is one mean over predicted tokens are weighted to the global-batch mean
    # (distributed.token_weight); the sums of losses (nsp, electra) average per process.
    token_mean = world.distributed and getattr(model, "loss_is_token_cross_entropy", True)
    fail_at = _injected_failure()
    bad_step = torch.tensor(-1, device=device)  # first step with a non-finite loss, kept on the device
    losses = LossWindow()
    started = time.perf_counter()
    window_start, window_steps = started, 0

    def wait_for_device() -> float:
        """Now, once the queued steps are done: evaluation and saves are then kept out of the
        throughput window (only at eval / save steps, which sync anyway)."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
    with progress, _SigtermFlag() as sigterm:
        bar = progress.add_task("train", total=max_steps, completed=start_step, loss="-", tps="-")
        for step in range(start_step + 1, max_steps + 1):
            if fail_at == f"{world.rank}:{init['step'] + step}":
                raise RuntimeError(f"injected failure on rank {world.rank} at step {init['step'] + step} "
                                   "(the PRETRAIN_FAIL_AT test hook)")
            step_loss = None
            for micro in range(cfg.grad_accum_steps):
                batch = loader.next_batch().to(device, non_blocking=True)
                last_micro = micro == cfg.grad_accum_steps - 1
                with distributed.gradient_sync(wrapped, last_micro), row_window(*loader.window, cfg.batch_size):
                    with amp():
                        loss, stats = step_fn(batch, gen)
                    if token_mean:
                        loss = loss * distributed.token_weight(stats["n_predicted"], world, device)
                    (loss / cfg.grad_accum_steps).backward()
                step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            # The norm is of the gradients averaged over processes, so every process agrees on `finite`.
            finite = torch.isfinite(loss) & torch.isfinite(distributed.plain_norm(grad_norm))
            if cfg.nonfinite == "skip" and not bool(finite):  # the one per-step sync, only under `skip`
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
                emit(step, {"train/skipped_nonfinite": 1.0})
            else:
                # A Python scalar, not torch.tensor(step, device=...): that one is a blocking host-to-device copy.
                bad_step = torch.where(~finite & (bad_step < 0), step, bad_step)
                losses.add(step_loss, cfg.grad_accum_steps)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            window_steps += 1
            if step % cfg.log_interval == 0 or step == max_steps:
                _raise_if_nonfinite(bad_step)
                window_loss = losses.mean()
                # The mean over the window's steps and micro-batches, of the global batch on every
                # process; the one read of the loss per log_interval. None: every step was skipped.
                loss_value = distributed.mean(window_loss, world).item() if window_loss is not None else None
                losses.reset()
                now = time.perf_counter()
                tps = window_steps * tokens_per_step / (now - window_start)
                window_start, window_steps = now, 0
                row = {"train/lr": scheduler.get_last_lr()[0], "throughput/tokens_per_s": tps,
                       "train/flops": init["flops"] + step * flops_per_step}
                if loss_value is not None:
                    row["train/loss"] = loss_value
                if peak:
                    row["throughput/mfu"] = mfu(tps * flops_per_step / tokens_per_step, peak, world.size)
                if device.type == "cuda":
                    row["memory/peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                emit(step, row)
                progress.update(bar, loss="-" if loss_value is None else f"{loss_value:.3f}", tps=f"{tps:,.0f}")
            evaluating = step % cfg.eval_interval == 0 or step == max_steps
            saving = step % interval == 0 or step == max_steps
            paused = wait_for_device() if evaluating or saving else 0.0
            if evaluating:
                last = {"step": step, **evaluate(model, val_rows, cfg, device, amp, world)}
                emit(step, {**{k: v for k, v in last.items() if k != "step"},
                            "train/flops": init["flops"] + step * flops_per_step})
            if saving:
                checkpoint(step)
            if evaluating or saving:
                window_start += time.perf_counter() - paused
            progress.update(bar, advance=1)
            # A SIGTERM reaches the processes at slightly different steps; agreeing on it (a host-side
            # flag, no device sync) makes them all stop after the same step.
            if distributed.any_flag(sigterm.raised, world):
                if step % interval and step != max_steps:
                    checkpoint(step)
                close_metrics()
                raise Stopped(step)
    elapsed = time.perf_counter() - started
    close_metrics()
    if not last:  # resumed a run that had already finished
        last = {"step": max_steps, **evaluate(model, val_rows, cfg, device, amp, world)}

    state = train_state(max_steps)
    module, _ = saved_state(with_optimizer=False)
    trained_steps = max_steps - start_step
    tokens_per_s = trained_steps * tokens_per_step / elapsed if trained_steps else 0.0
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
        "throughput/tokens_per_s": tokens_per_s,
        "device": str(device),
        "resumed_from_step": start_step,
        "skipped_steps": skipped,
    }
    if world.distributed:
        summary.update({"world_size": world.size, "parallelism": cfg.parallelism})
    if peak and trained_steps:  # over the whole run, evaluation and saves included (as tokens/s above)
        summary["mfu"] = mfu(tokens_per_s * flops_per_step / tokens_per_step, peak, world.size)
    if device.type == "cuda":
        summary["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if world.main:
        save_checkpoint(out_dir / "checkpoint", module, cfg, state)
        earlier = out_dir / "summary.json"
        if not trained_steps and earlier.exists():  # nothing left to train: keep the speed the run was trained at
            before = json.loads(earlier.read_text())
            summary.update({k: before[k] for k in ("throughput/tokens_per_s", "train_seconds", "mfu") if k in before})
        earlier.write_text(json.dumps(summary, indent=2))
    distributed.barrier()
    return summary


@record  # an uncaught exception goes to this rank's error file (TORCHELASTIC_ERROR_FILE), which the supervisor reports
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="resolved training config (JSON)")
    args = parser.parse_args(argv)
    try:
        cfg = read_train_config(args.config)
        summary = train(cfg)
    except Stopped as exc:
        if distributed.world_from_env().main:
            console.print(f"[yellow]{exc}[/yellow]")
        return 128 + signal.SIGTERM
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, FloatingPointError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        ErrorHandler().record_exception(exc)  # the one-line error in this rank's error file, for the supervisor
        return 2
    if distributed.world_from_env().main:
        console.print(f"done: val/loss={summary.get('val/loss', float('nan')):.4f} "
                      f"tokens/s={summary['throughput/tokens_per_s']:,.0f} -> {cfg.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
