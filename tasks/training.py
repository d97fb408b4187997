"""Pretraining as a supervised subprocess (`python -m model.train`), metrics streamed to MLflow."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from prefect import task

from model.checkpoint import load_pretrained
from model.export import export_hf
from tasks.caching import stage_cache_key
from tasks.tracking import MetricsTail, client
from tasks.workspace import PACKAGE_ROOT, Workspace


class TrainingFailed(RuntimeError):
    pass


@task(name="pretrain", cache_key_fn=stage_cache_key("model", exclude=("mlflow_run_id",)),
      persist_result=True, result_serializer="json")
def pretrain(train_config: dict, tokenizer_path: str, mlflow_run_id: str | None = None) -> dict:
    """Train one objective in its own process; export the result in Hugging Face format."""
    out = Path(train_config["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "train_config.json"
    config_path.write_text(json.dumps(train_config, indent=2))
    tail = MetricsTail(client(Workspace.from_env()), mlflow_run_id, out / "metrics.jsonl")
    proc = subprocess.Popen([sys.executable, "-m", "model.train", "--config", str(config_path)], cwd=PACKAGE_ROOT)
    while proc.poll() is None:
        time.sleep(1.0)
        tail.poll()
    tail.poll()
    if proc.returncode != 0:
        raise TrainingFailed(f"pretraining {train_config['objective']} exited with code {proc.returncode}; "
                             f"its output is above, its files in {out}")
    model, _ = load_pretrained(out / "checkpoint")
    hf_dir = export_hf(model, out / "hf", tokenizer_path, train_config["specials"])
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
