"""Pretraining as a supervised subprocess (`python -m model.train`), metrics streamed to MLflow."""
from __future__ import annotations

import json
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


@task(name="pretrain", cache_key_fn=stage_cache_key("model", exclude=("mlflow_run_id",), skip=EVALUATION_ONLY),
      persist_result=True, result_serializer="json")
def pretrain(train_config: dict, tokenizer_path: str, mlflow_run_id: str | None = None) -> dict:
    """Train one objective in its own process; export the result in Hugging Face format."""
    out = Path(train_config["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "train_config.json"
    config_path.write_text(json.dumps(train_config, indent=2))
    tail = MetricsTail(client(Workspace.from_env()), mlflow_run_id, out / "metrics.jsonl")
    proc = subprocess.Popen([sys.executable, "-m", "model.train", "--config", str(config_path)], cwd=PACKAGE_ROOT)
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
    tail.poll()
    if proc.returncode != 0:
        if mlflow_run_id:
            tail.c.set_terminated(mlflow_run_id, "KILLED" if proc.returncode == 128 + signal.SIGTERM else "FAILED")
        raise TrainingFailed(f"pretraining {train_config['objective']} {exit_reason(proc.returncode)} "
                             f"(files in {out})")
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
