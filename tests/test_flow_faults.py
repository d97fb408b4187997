"""Faults around a running pipeline: the trainer killed, the flow run sent SIGTERM, runs left behind."""
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tasks.tracking import read_metric_rows, reap_stale_runs, start_run
from tests.conftest import ROOT, write_corpus
from tests.test_pipeline import tiny_config

LONG_TRAIN = {"seq_len": 32, "batch_size": 4, "max_steps": 1500, "warmup_steps": 5, "eval_interval": 500,
              "checkpoint_interval": 20, "eval_batches": 2, "log_interval": 10}


def _trainer_pid(parent: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"model.train" in cmdline:
            return int(entry.name)
    return None


def _metrics_step(home: Path) -> int:
    return max([0] + [row["step"] for path in home.glob("runs/clm-*/metrics.jsonl") for row in read_metric_rows(path)])


@pytest.mark.parametrize("fault", ["sigterm-flow", "sigkill-trainer"])
def test_a_stopped_or_killed_training_fails_cleanly_and_the_rerun_resumes(tmp_path, fault):
    home = tmp_path / "ws"
    corpus = write_corpus(tmp_path / "corpus", n_docs=150)
    config = tiny_config(tmp_path, objectives=["clm"], train=LONG_TRAIN, downstream={"task": "none"},
                         experiment="faults", corpus={"path": str(corpus), "val_frac": 0.2, "test_frac": 0.1})
    cmd = [sys.executable, "-m", "flows.cli", "run", "-c", str(config)]
    env = {**os.environ, "PRETRAIN_HOME": str(home)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while _metrics_step(home) < 50:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    sent = time.time()
    if fault == "sigterm-flow":
        proc.send_signal(signal.SIGTERM)
    else:
        os.kill(_trainer_pid(proc.pid), signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert time.time() - sent < 60
    assert proc.returncode != 0
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    reason = "stopped by SIGTERM" if fault == "sigterm-flow" else "killed by SIGKILL"
    assert len(errors) == 1 and reason in errors[0], err[-3000:]

    c = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = c.get_experiment_by_name("faults")
    runs = {r.info.run_name: r.info.status for r in c.search_runs([exp.experiment_id])}
    assert runs["clm"] == ("KILLED" if fault == "sigterm-flow" else "FAILED"), runs
    assert [s for name, s in runs.items() if name.startswith("pipeline-")] == ["FAILED"], runs
    (run_dir,) = home.glob("runs/clm-*")
    assert list((run_dir / "checkpoints").glob("step-*"))

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr
    for stage in ("ingest", "snapshot \\+ split", "tokenizer", "token shards", "examples clm"):
        assert re.search(rf"\] {stage}\s+cached", again.stderr), stage  # only the unfinished work is redone
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] >= 20
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 1500  # one clean curve, no duplicated steps


def test_runs_left_running_by_a_dead_process_are_marked_killed(tmp_path):
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.create_experiment("stale", artifact_location=(tmp_path / "artifacts").as_uri())
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = start_run(c, exp, "orphan")
    c.set_tag(orphan, "pretrain.pid", str(dead.pid))
    ours = start_run(c, exp, "ours")  # this process: alive
    elsewhere = start_run(c, exp, "elsewhere")
    c.set_tag(elsewhere, "pretrain.host", socket.gethostname() + "-other")
    c.set_tag(elsewhere, "pretrain.pid", str(dead.pid))

    assert reap_stale_runs(c, exp) == [orphan]
    assert c.get_run(orphan).info.status == "KILLED"
    assert c.get_run(ours).info.status == "RUNNING"
    assert c.get_run(elsewhere).info.status == "RUNNING"


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_a_flow_run_left_running_is_reported(prefect_harness):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from flows.pipeline import _report_orphaned_flow_runs

    @flow(name="pretrain-pipeline")
    def stand_in():  # same flow name; its run is created and left Running, as by a process that died
        pass

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(stand_in, name="left-behind")
        client.set_flow_run_state(run.id, Running())
    logger, collect = logging.getLogger("test-orphans"), _Collect()
    logger.addHandler(collect)
    _report_orphaned_flow_runs(logger)
    assert any("left-behind" in m and "still marked running" in m for m in collect.messages)
