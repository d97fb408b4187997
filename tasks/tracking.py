"""MLflow through an explicit client and run ids (no global active run), SQLite store in the workspace."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from tasks.workspace import Workspace


def client(ws: Workspace) -> MlflowClient:
    ws.root.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=ws.mlflow_uri)


def experiment_id(c: MlflowClient, ws: Workspace, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=(ws.artifacts / name).as_uri())


def start_run(c: MlflowClient, exp_id: str, name: str, parent: str | None = None, tags: dict[str, str] | None = None) -> str:
    tags = dict(tags or {})
    if parent:
        tags["mlflow.parentRunId"] = parent
    return c.create_run(exp_id, run_name=name, tags=tags).info.run_id


def log_params(c: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def log_metrics(c: MlflowClient, run_id: str, values: dict[str, float], step: int = 0) -> None:
    log_metric_rows(c, run_id, [{"step": step, **values}])


def log_metric_rows(c: MlflowClient, run_id: str, rows: Iterable[dict]) -> int:
    """Rows as written to metrics.jsonl: {"step": n, "<key>": value, ...}."""
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, int(row.get("step", 0))) for row in rows for k, v in row.items()
               if k != "step" and isinstance(v, (int, float))]
    for i in range(0, len(metrics), 1000):
        c.log_batch(run_id, metrics=metrics[i : i + 1000])
    return len(metrics)


class MetricsTail:
    """Follows a growing JSON-lines file and forwards complete lines to an MLflow run."""

    def __init__(self, c: MlflowClient, run_id: str | None, path: Path):
        self.c, self.run_id, self.path, self.offset = c, run_id, path, 0

    def poll(self) -> None:
        if self.run_id is None or not self.path.exists():
            return
        with open(self.path) as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        self.offset += len(complete.encode())
        rows = [json.loads(line) for line in complete.splitlines() if line.strip()]
        if rows:
            log_metric_rows(self.c, self.run_id, rows)


def read_metric_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
