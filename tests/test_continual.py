"""Continual pretraining for real: three data drops through the `continual-pretraining` flow
(prefect_test_harness, MLflow SQLite with its model registry, DuckDB), then a run with no new data."""
import csv
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, run_cli

WORDS = {  # each drop leans on its own words, so that forgetting has something to show
    1: "data model token train layer attention mask predict sentence corpus".split(),
    2: "python function value return object module class method string list".split(),
    3: "number file error test run loss graph node edge weight".split(),
}
COMMON = "the a of to and in is for with on".split()


def drop(folder: Path, k: int, n_docs: int = 36) -> None:
    """Drop k: `n_docs` new text files in the watched folder."""
    rng = random.Random(k)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        words = WORDS[k] + COMMON
        text = " ".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(6))
        (folder / f"drop{k}-{i:03d}.txt").write_text(text)


def task_file(path: Path) -> Path:
    """A small labelled task: which drop's vocabulary does a text use?"""
    rng = random.Random(99)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(90):
            label = 1 + i % 2
            w.writerow([" ".join(rng.choice(WORDS[label] + COMMON) for _ in range(16)), f"drop{label}"])
    return path


def config(tmp: Path, watched: Path, **gate) -> Path:
    cfg = {
        "experiment": "continual-test",
        "continual": {"sources": [{"name": "drops", "path": str(watched)}], "objective": "clm", "size": "tiny",
                      "steps_per_update": 10, "init_optimizer": "restore", "replay": 0.5,
                      "gate": {"max_old_loss_increase": 10.0, "max_score_drop": 1.0, **gate},
                      "registered_model": "test-lm", "alias": "champion"},
        "corpus": {"val_frac": 0.25, "test_frac": 0.05},
        "tokenizer": {"vocab_size": 400},
        "train": {"seq_len": 32, "batch_size": 8, "warmup_steps": 2, "eval_interval": 5, "eval_batches": 2,
                  "log_interval": 5},
        "downstream": {"task": "which-drop", "path": str(task_file(tmp / "task.csv")), "seeds": [0],
                       "finetune": {"epochs": 1, "max_len": 32, "batch_size": 16}},
    }
    path = tmp / "continual.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _client(home: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")


def versions(home: Path) -> list:
    return sorted(_client(home).search_model_versions("name = 'test-lm'"), key=lambda v: int(v.version))


@pytest.fixture(scope="module")
def series(prefect_harness, tmp_path_factory):
    """A workspace, a watched folder and a config; `run` runs the flow once, as a schedule would."""
    from flows.continual import continual_pretraining

    tmp = tmp_path_factory.mktemp("continual")
    home, watched = tmp / "workspace", tmp / "incoming"
    before = os.environ.get("PRETRAIN_HOME")
    os.environ["PRETRAIN_HOME"] = str(home)
    path = str(config(tmp, watched))

    def run(overrides: list[str] = ()):
        started = time.perf_counter()
        state = continual_pretraining(config_path=path, overrides=list(overrides), return_state=True)
        return state, time.perf_counter() - started

    try:
        yield {"home": home, "watched": watched, "run": run, "states": []}
    finally:
        if before is None:
            os.environ.pop("PRETRAIN_HOME", None)
        else:
            os.environ["PRETRAIN_HOME"] = before


STRICT = ["continual.gate.max_old_loss_increase=-10"]  # the old data's loss must fall by 10 nats: never passes


@pytest.fixture(scope="module")
def update1(series):
    """Drop 1, while another run holds the training slot for 5 s."""
    from prefect.concurrency.sync import concurrency

    from flows.continual import ensure_slot

    drop(series["watched"], 1)
    ensure_slot("continual-train-test-lm")
    box = []
    with concurrency("continual-train-test-lm", occupy=1, strict=True):  # another run is training
        waiting = threading.Thread(target=lambda: box.append(series["run"]()[0]))
        waiting.start()
        time.sleep(5)
        series["versions_while_slot_held"] = len(versions(series["home"]))
    waiting.join(timeout=600)
    series["states"].append(box[0])
    return series


@pytest.fixture(scope="module")
def update2(update1):
    drop(update1["watched"], 2)
    update1["states"].append(update1["run"]()[0])
    return update1


@pytest.fixture(scope="module")
def update3(update2):
    """Drop 3 under a gate that cannot pass; before it, a snapshot of the same data with another
    corpus.test_frac is made (as `pretrain data ingest` would), so that it is older than update 3's."""
    from warehouse import store
    from warehouse.dedup import NearDupConfig
    from warehouse.quality import QualityConfig
    from warehouse.sources import SourceSpec

    drop(update2["watched"], 3)
    db = str(update2["home"] / "warehouse.duckdb")
    store.ingest(db, [SourceSpec(name="drops", path=str(update2["watched"]))], 32, quality=QualityConfig())
    update2["older"] = store.create_snapshot(db, "older", ["drops"], 0.25, 0.06, NearDupConfig()).snapshot_id
    update2["states"].append(update2["run"](STRICT)[0])
    return update2


def test_a_run_waits_for_the_training_slot_then_trains_the_first_model(update1):
    assert update1["versions_while_slot_held"] == 0  # nothing trained while another run held the slot
    state = update1["states"][0]
    assert state.is_completed(), state.message
    first = state.result()
    assert first["slot_wait_s"] > 3 and first["status"] == "trained"
    s = first["summary"]
    assert (s["init_step"], s["steps"]) == (0, 10) and s["init_from"] == ""
    assert first["gate"]["decision"] == "first" and first["champion_version"] == "1"
    (v,) = versions(update1["home"])
    assert v.tags["snapshot_id"] == first["snapshot_id"] and v.source.endswith("/hf_model")
    c = _client(update1["home"])
    assert str(c.get_model_version_by_alias("test-lm", "champion").version) == "1"
    assert c.list_artifacts(v.run_id, "hf_model")
    m = c.get_run(first["run_id"]).data.metrics
    assert {k for k in m if k.startswith("heldout/")} == {f"heldout/{first['snapshot_id'][:8]}/loss"}


def test_the_second_drop_continues_the_champion_with_the_step_count_going_on(update2):
    first, second = (st.result() for st in update2["states"])
    assert second["snapshot_id"] != first["snapshot_id"] and second["status"] == "trained"
    s1, s2 = first["summary"], second["summary"]
    assert (s2["init_step"], s2["steps"]) == (10, 20) and "step-0000010" in s2["init_from"]
    assert s2["tokens_seen"] == 2 * s1["tokens_seen"]
    c = _client(update2["home"])
    # The training metrics of the second update continue the first's curve.
    assert [m.step for m in c.get_metric_history(second["run_id"], "train/loss")] == [15, 20]
    params = c.get_run(second["run_id"]).data.params
    assert params["champion_version"] == "1" and params["init_optimizer"] == "restore"
    assert int(params["new_documents"]) > 0 and int(params["replay_documents"]) > 0
    # Lenient tolerances: the gate passed, after comparing both the old data's loss and the downstream score.
    assert second["gate"]["decision"] == "passed"
    assert {"old_loss_increase", "score_drop"} <= set(second["gate"]["numbers"])
    assert str(c.get_model_version_by_alias("test-lm", "champion").version) == "2"
    run = c.get_run(second["run_id"])
    assert run.data.metrics["gate/passed"] == 1.0 and "gate/champion_score" in run.data.metrics


def test_a_third_drop_that_fails_the_gate_leaves_the_alias_where_it_was(update3):
    third = update3["states"][2]
    assert third.is_completed() and third.message.endswith("(gate failed; steps 20 -> 30)")
    r = third.result()
    assert (r["summary"]["init_step"], r["summary"]["steps"]) == (20, 30)
    assert r["gate"]["decision"] == "failed" and r["gate"]["numbers"]["max_old_loss_increase"] == -10
    assert [v.tags["gate"] for v in versions(update3["home"])] == ["first", "passed", "failed"]
    c = _client(update3["home"])
    assert str(c.get_model_version_by_alias("test-lm", "champion").version) == "2"
    run = c.get_run(r["run_id"])
    assert run.data.tags["gate.decision"] == "failed" and run.data.metrics["gate/passed"] == 0.0
    assert "held-out loss on earlier data" in run.data.tags["gate.reasons"]


def test_forgetting_is_logged_for_every_earlier_snapshot_and_plotted(update3):
    c = _client(update3["home"])
    results = [st.result() for st in update3["states"]]
    snaps = [r["snapshot_id"][:8] for r in results]
    m3 = c.get_run(results[2]["run_id"]).data.metrics
    for old in snaps[:2]:
        assert m3[f"heldout/{old}/loss"] > 0 and m3[f"heldout/{old}/champion_loss"] > 0
        assert m3[f"forgetting/{old}"] == pytest.approx(m3[f"heldout/{old}/loss"] - m3[f"heldout/{old}/champion_loss"])
    assert f"gain/{snaps[2]}" in m3 and f"forgetting/{snaps[2]}" not in m3
    artefacts = {a.path for a in c.list_artifacts(results[2]["run_id"])}
    assert {"forgetting.png", "continual_report.md", "tokenizer.json"} <= artefacts
    assert Path(results[2]["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = Path(results[2]["report"]).read_text()
    assert "Decision: **failed**" in report and all(f"`{s}`" in report for s in snaps)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        (md,) = [a for a in client.read_artifacts() if a.key == "continual-test-lm" and "Decision: **failed**" in a.data]
    assert md.type == "markdown" and "forgetting.png" in md.data


def test_a_run_without_new_data_is_a_fast_no_op(update3):
    idle, seconds = update3["run"](STRICT)
    assert idle.is_completed() and idle.message.startswith("no new data")
    assert idle.result()["trained"] is False
    assert seconds < 10, seconds
    assert len(versions(update3["home"])) == 3


def test_a_snapshot_older_than_the_last_trained_one_is_not_trained_over_it(update3):
    late, _ = update3["run"]([*STRICT, "corpus.test_frac=0.06"])
    assert late.is_completed() and late.result()["status"] == "superseded"
    assert late.result()["snapshot_id"] == update3["older"]
    assert f"older than snapshot {update3['states'][2].result()['snapshot_id']}" in late.message
    assert len(versions(update3["home"])) == 3


def test_the_flow_module_imports_no_torch_or_mlflow():
    """What a served run with no new data loads: the no-op path must not pay for torch."""
    code = "import sys, flows.continual; print(sorted(m for m in ('torch', 'mlflow', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_prefect_deploy_registers_the_scheduled_continual_deployment(prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="local-process", type="process"), overwrite=True)
    out = subprocess.run([str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--name", "continual"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180,
                         env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("continual-pretraining/continual")
    assert dep.parameters == {"config_path": "continual.yaml", "overrides": []}
    assert [s.schedule.interval.total_seconds() for s in dep.schedules] == [3600]
    assert dep.global_concurrency_limit.limit == 1 and dep.concurrency_options.collision_strategy == "ENQUEUE"
    assert dep.work_pool_name == "local-process"


def test_the_shipped_continual_config_loads_and_bad_keys_are_one_clear_error():
    from flows.continual import load_continual_config
    from model.config import ConfigError

    cc, cfg = load_continual_config("continual.yaml")
    assert cfg.objectives == [cc.objective] and cfg.train["max_steps"] == cc.steps_per_update
    assert cc.sources[0].path.endswith("/incoming") and "$" not in cc.sources[0].path
    for override, message in [
        ("continual.replay=2", "continual.replay=2 must be between 0 and 1"),
        ("continual.objective=xlnet", "continual.objective='xlnet' is unknown"),
        ("train.max_steps=5", "train.max_steps is set by continual.steps_per_update"),
        ("continual.gate.max_score_drop=x", "'continual.gate.max_score_drop' expects float"),
        ("continual.gatez=1", "unknown config key 'continual.gatez'"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_continual_config("continual.yaml", [override])


def test_cli_continual_missing_folder_is_one_line_and_an_empty_one_is_no_new_data(prefect_harness, tmp_path):
    from prefect.settings import PREFECT_API_URL

    # The harness's server: the command then starts no temporary one of its own.
    env = {"PRETRAIN_HOME": str(tmp_path / "ws"), "PREFECT_API_URL": PREFECT_API_URL.value()}
    missing = run_cli("continual", "--set", f"continual.sources=[{{name: mine, path: {tmp_path / 'nope'}}}]",
                      env=env, timeout=120)
    assert missing.returncode == 2
    lines = [ln for ln in missing.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "watched source 'mine':" in lines[0] and "does not exist" in lines[0], missing.stderr
    (tmp_path / "empty").mkdir()
    empty = run_cli("continual", "--set", f"continual.sources=[{{name: mine, path: {tmp_path / 'empty'}}}]",
                    env=env, timeout=300)
    assert empty.returncode == 0, empty.stderr[-2000:]
    assert "no new data: the watched sources hold no files yet" in empty.stdout
    # The shipped config watches a folder inside the workspace: a first run creates it and finds nothing.
    first = run_cli("continual", env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "no new data: the watched sources hold no files yet" in first.stdout
    assert (tmp_path / "ws" / "incoming").is_dir()


def test_serve_serves_the_pipeline_and_the_continual_deployment(tmp_path):
    import json
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tmp_path / "ws"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--prefect-port", str(port), "--continual-every",
                             "5"], cwd=ROOT, env={**os.environ, "PRETRAIN_HOME": str(home), "PREFECT_RUNNER_POLL_FREQUENCY": "2"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, seen = time.monotonic() + 150, ""
        while time.monotonic() < deadline and "being served" not in seen:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            seen += line
        assert "being served" in seen, seen[-2000:]
        assert f"continual: drop text files into {home / 'incoming'}" in seen and (home / "incoming").is_dir()
        def post(path: str, body: dict) -> list[dict]:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())

        deps = {d["name"]: d for d in post("deployments/filter", {})}
        assert set(deps) == {"pretrain-pipeline", "continual"}
        continual = deps["continual"]
        assert continual["parameters"] == {"config_path": "continual.yaml", "overrides": []}
        assert [s["schedule"]["interval"] for s in continual["schedules"]] == [5.0]
        # The server's scheduler creates the runs and `serve` executes them: the first ones find the
        # watched folder empty and end as Completed "no new data".
        done, deadline = [], time.monotonic() + 120
        while not done and time.monotonic() < deadline:
            runs = post("flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [continual["id"]]}}})
            done = [r for r in runs if r["state_type"] == "COMPLETED"]
            time.sleep(2)
        assert done, [(r["name"], r["state_type"]) for r in runs]
        assert "no new data" in done[0]["state"]["message"]
        assert continual["global_concurrency_limit"]["limit"] == 1
        assert continual["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
