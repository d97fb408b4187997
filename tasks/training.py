"""Pretraining as a supervised subprocess (`python -m model.train`, or `torchrun` for several processes),
metrics streamed to MLflow."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prefect import task

from model.checkpoint import load_pretrained
from model.hf import export_hf
from tasks.caching import EVALUATION_ONLY, stage_cache_key
from tasks.tracking import MetricsTail, client
from tasks.workspace import PACKAGE_ROOT, Workspace


class TrainingFailed(RuntimeError):
    pass


# The trainers this process runs. A signal reaches the main thread only: a flow that trains from
# worker threads stops their trainers through this (each saves a checkpoint and exits).
_running: set[subprocess.Popen] = set()


def stop_running_trainers() -> None:
    for proc in list(_running):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)


def _stop_trainer(proc: subprocess.Popen, grace: float = 60.0) -> None:
    """SIGTERM makes the trainer save a checkpoint and exit; it is killed only if it does not within `grace`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def exit_reason(returncode: int) -> str:
    if returncode == 128 + signal.SIGTERM:
        return "stopped by SIGTERM; its checkpoint is saved and re-running the flow resumes from it"
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (the out-of-memory killer, or a kill -9)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}; re-running the flow resumes from its last checkpoint"
    return f"exited with code {returncode}; its error is printed above"


def world_size(train_config: dict) -> int:
    return int(train_config.get("nproc_per_node", 1)) * int(train_config.get("nnodes", 1))


def launch_command(train_config: dict, config_path: Path, log_dir: Path) -> list[str]:
    """`python -m model.train`, or torchrun when the config asks for more than one process or node.

    torchrun tees every rank's output to the console and to `<log_dir>/<run>/attempt_0/<rank>/`, where
    a rank that fails also leaves `error.json` (model.train's `main` is decorated with `@record`). With
    several nodes, each node runs this same command (the same config, e.g. the task on every node):
    they meet at `rdzv_endpoint` under an id derived from out_dir, and out_dir must be shared storage.
    """
    entry = ["-m", "model.train", "--config", str(config_path)]
    if world_size(train_config) <= 1:
        return [sys.executable, *entry]
    nnodes = int(train_config.get("nnodes", 1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(train_config["nproc_per_node"]),
           "--nnodes", str(nnodes)]
    if nnodes == 1:
        cmd.append("--standalone")  # a local rendezvous on a free port
    else:
        run_id = hashlib.sha256(str(train_config["out_dir"]).encode()).hexdigest()[:16]
        cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", train_config["rdzv_endpoint"], "--rdzv_id", run_id]
    return [*cmd, "--log_dir", str(log_dir), "--tee", "3", *entry]


def failed_rank_error(log_dir: Path, earlier: set[Path]) -> str | None:
    """The root cause of a failed torchrun launch: the first error file a rank wrote, as `rank R: message`.

    Ranks that die after it (a peer gone from a collective, or stopped by torchrun) may write their own
    errors later; the file written first (by modification time) is the rank that failed.
    """
    if not log_dir.exists():
        return None
    found = []
    for run_dir in set(log_dir.iterdir()) - earlier:  # torchrun makes one folder per launch
        for path in run_dir.glob("attempt_*/*/error.json"):
            try:
                message = json.loads(path.read_text())["message"]
            except (OSError, json.JSONDecodeError, KeyError):
                continue
            text = message.get("message", "") if isinstance(message, dict) else str(message)
            found.append((path.stat().st_mtime_ns, int(path.parent.name), text.strip()))
    if not found:
        return None
    _, rank, text = min(found)
    return f"rank {rank}: {text}"


def single_process_env(log_dir: Path) -> dict[str, str]:
    """The environment of a one-process launch: `@record` on model.train's main writes an uncaught error
    to TORCHELASTIC_ERROR_FILE, laid out as torchrun lays out a rank's, so one reader serves both."""
    error_file = log_dir / f"single-{time.time_ns()}" / "attempt_0" / "0" / "error.json"
    error_file.parent.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "TORCHELASTIC_ERROR_FILE": str(error_file)}


def _launch_failure(train_config: dict, returncode: int, log_dir: Path, earlier: set[Path]) -> str:
    if world_size(train_config) <= 1:  # an error file only from an exception, not from a signal
        error = failed_rank_error(log_dir, earlier) if returncode > 0 else None
        return f"failed: {error.split(': ', 1)[1]}" if error else exit_reason(returncode)
    rank_error = failed_rank_error(log_dir, earlier)
    if rank_error:
        return f"failed on {rank_error} (every rank's log in {log_dir})"
    return (f"failed: torchrun exited with code {returncode} and no rank left an error (a rank killed by a signal: "
            f"SIGTERM, SIGKILL or the out-of-memory killer); every rank's log is in {log_dir}, and re-running the "
            "flow resumes from the last checkpoint")


@task(name="pretrain", cache_key_fn=stage_cache_key("model", exclude=("mlflow_run_id",), skip=EVALUATION_ONLY),
      persist_result=True, result_serializer="json")
def pretrain(train_config: dict, tokenizer_path: str, mlflow_run_id: str | None = None) -> dict:
    """Train one objective in its own process; export the result in Hugging Face format."""
    out = Path(train_config["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "train_config.json"
    config_path.write_text(json.dumps(train_config, indent=2))
    tail = MetricsTail(client(Workspace.from_env()), mlflow_run_id, out / "metrics.jsonl")
    log_dir = out / "logs"
    earlier = set(log_dir.iterdir()) if log_dir.exists() else set()
    env = single_process_env(log_dir) if world_size(train_config) <= 1 else None
    proc = subprocess.Popen(launch_command(train_config, config_path, log_dir), cwd=PACKAGE_ROOT, env=env)
    _running.add(proc)
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            tail.poll()
    except BaseException:  # the flow run is being stopped (SIGTERM, Ctrl-C, cancellation): stop cleanly too
        _stop_trainer(proc)
        tail.poll()
        if mlflow_run_id:
            tail.c.set_terminated(mlflow_run_id, "KILLED")
        raise
    finally:
        _running.discard(proc)
    tail.poll()
    if proc.returncode != 0:
        if mlflow_run_id:
            tail.c.set_terminated(mlflow_run_id, "KILLED" if proc.returncode == 128 + signal.SIGTERM else "FAILED")
        raise TrainingFailed(f"pretraining {train_config['objective']} "
                             f"{_launch_failure(train_config, proc.returncode, log_dir, earlier)} (files in {out})")
    model, _ = load_pretrained(out / "checkpoint")
    hf_dir = export_hf(model, train_config["objective"], out / "hf", tokenizer_path, train_config["specials"])
    summary = json.loads((out / "summary.json").read_text())
    return {
        "objective": train_config["objective"],
        "out_dir": str(out),
        "checkpoint": str(out / "checkpoint"),
        "hf_dir": str(hf_dir),
        "metrics_file": str(out / "metrics.jsonl"),
        "summary": summary,
        "mlflow_run_id": mlflow_run_id,
        "outputs": [str(out / "checkpoint" / "COMPLETE"), str(hf_dir / "model.safetensors"), str(out / "metrics.jsonl")],
    }
