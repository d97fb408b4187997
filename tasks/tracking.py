"""MLflow through an explicit client and run ids (no global active run), SQLite store in the workspace."""
from __future__ import annotations

import json
import os
import re
import socket
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
    if not ws.local_mlflow:  # a tracking server stores artefacts where it is configured to
        return c.create_experiment(name)
    return c.create_experiment(name, artifact_location=(ws.artifacts / name).as_uri())


def start_run(c: MlflowClient, exp_id: str, name: str, parent: str | None = None, tags: dict[str, str] | None = None) -> str:
    # Host and pid let a later pipeline tell a run whose process died from one still going.
    tags = {**{k: scrub(str(v)) for k, v in (tags or {}).items()},
            "pretrain.host": socket.gethostname(), "pretrain.pid": str(os.getpid())}
    if parent:
        tags["mlflow.parentRunId"] = parent
    return c.create_run(exp_id, run_name=name, tags=tags).info.run_id


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale_runs(c: MlflowClient, exp_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose process is gone (a crash, a reboot, SIGKILL).

    Runs started on other hosts are left alone: from here nobody can tell whether they still run.
    """
    host, killed = socket.gethostname(), []
    for run in c.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        pid = tags.get("pretrain.pid", "")
        if tags.get("pretrain.host") == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            c.set_terminated(run.info.run_id, "KILLED")
            killed.append(run.info.run_id)
    return killed


SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s:@]+(?::[^/\s@]*)?@")


def scrub(text: str) -> str:
    """Remove credentials before anything reaches MLflow: user:password@ in URLs, and the values of
    environment variables whose names say they are secrets (HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...)."""
    text = URL_CREDENTIALS.sub(r"\g<scheme>***@", text)
    for name, value in os.environ.items():
        if SECRET_ENV.search(name) and len(value) >= 6 and value in text:
            text = text.replace(value, "***")
    return text


def log_dict(c: MlflowClient, run_id: str, data: dict, artifact_file: str) -> None:
    c.log_dict(run_id, json.loads(scrub(json.dumps(data, default=str))), artifact_file)


def log_params(c: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, scrub(str(v))[:6000]) for k, v in params.items()]
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
    """Follows a growing JSON-lines file and forwards complete lines to an MLflow run.

    A resumed trainer replaces the file by a copy cut at its checkpoint (a new inode); the tail then
    starts over and forwards only the steps it has not forwarded yet.
    """

    def __init__(self, c: MlflowClient, run_id: str | None, path: Path):
        self.c, self.run_id, self.path = c, run_id, path
        self.offset, self.inode, self.seen = 0, None, set()

    def poll(self) -> None:
        if self.run_id is None or not self.path.exists():
            return
        with open(self.path, "rb") as f:
            stat = os.fstat(f.fileno())
            if stat.st_ino != self.inode or stat.st_size < self.offset:
                self.inode, self.offset = stat.st_ino, 0
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        rows = []
        for row in parse_metric_lines(complete.decode(errors="replace")):
            key = (row.get("step", 0), tuple(sorted(row)))
            if key not in self.seen:  # rows before the resumed step were forwarded already
                self.seen.add(key)
                rows.append(row)
        if rows:
            log_metric_rows(self.c, self.run_id, rows)


def parse_metric_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a killed trainer
            continue
    return rows


def read_metric_rows(path: Path) -> list[dict]:
    return parse_metric_lines(Path(path).read_text())
