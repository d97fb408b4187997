"""The whole pipeline, for real: Prefect (test harness and the CLI's own server), MLflow SQLite, DuckDB."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, run_cli, write_corpus

TINY = {
    "experiment": "pipeline-test",
    "tokenizer": {"vocab_size": 1000},
    "objectives": ["mlm", "clm"],
    "model": {"size": "tiny"},
    "train": {"seq_len": 64, "batch_size": 8, "max_steps": 30, "warmup_steps": 5, "eval_interval": 15,
              "eval_batches": 2, "log_interval": 5},
    "downstream": {"n_classes": 4, "finetune": {"epochs": 1, "max_len": 64}},
}


def tiny_config(folder: Path, **changes) -> Path:
    cfg = {**TINY, **changes}
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_flow_logs_runs_metrics_artefacts_and_prefect_report(prefect_harness, workspace, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.pipeline import pretrain_pipeline
    from tasks.workspace import Workspace

    result = pretrain_pipeline(config_path=str(tiny_config(tmp_path)))
    ws = Workspace.from_env()
    assert ws.root == workspace.resolve() and ws.warehouse.exists() and ws.mlflow_db.exists()

    c = MlflowClient(tracking_uri=ws.mlflow_uri)
    exp = c.get_experiment_by_name("pipeline-test")
    runs = c.search_runs([exp.experiment_id])
    parent = c.get_run(result["parent_run_id"])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.info.run_name for r in children} == {"mlm", "clm", "random-init"}
    assert parent.data.tags["prefect.flow_run_id"] and parent.data.tags["snapshot_id"] == result["snapshot_id"]
    assert "git_commit" in parent.data.tags
    for r in children:
        assert r.info.status == "FINISHED"
        assert {"objective", "model_size", "snapshot_id", "seed"} <= set(r.data.params)
        assert r.data.params["snapshot_id"] == result["snapshot_id"]
        m = r.data.metrics
        assert 0 <= m["downstream/stdlib-module/full/accuracy"] <= 1 and 0 <= m["downstream/stdlib-module/full/macro_f1"] <= 1
        assert m["downstream/stdlib-module/accuracy"] == m["downstream/stdlib-module/full/accuracy"]  # the stable key
        (cell,) = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == r.info.run_id]  # one method, one seed
        assert cell.info.run_name == f"{r.info.run_name}/full/s0" and cell.info.status == "FINISHED"
        assert {k: cell.data.params[k] for k in ("method", "seed", "variant")} == {
            "method": "full", "seed": "0", "variant": r.info.run_name}
        assert cell.data.metrics["test/accuracy"] == m["downstream/stdlib-module/full/accuracy"]
        assert [h.step for h in c.get_metric_history(cell.info.run_id, "finetune/val_accuracy")] == [1]
        if r.info.run_name == "random-init":
            continue
        assert m["val/loss"] > 0 and m["throughput/tokens_per_s"] > 0
        history = c.get_metric_history(r.info.run_id, "train/loss")
        assert [h.step for h in history] == [5, 10, 15, 20, 25, 30]
        artefacts = {a.path for a in c.list_artifacts(r.info.run_id)}
        assert {"tokenizer.json", "hf_model", "config"} <= artefacts
        assert {a.path for a in c.list_artifacts(r.info.run_id, "hf_model")} >= {
            "hf_model/config.json", "hf_model/model.safetensors", "hf_model/tokenizer.json"}
    parent_artefacts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"report.md", "report.html", "loss_curves.png", "downstream.png", "finetune_curves.png", "pairwise_tests.csv",
            "tokenizer.json", "pipeline_config.json"} <= parent_artefacts
    html = Path(result["html"]).read_text()
    assert "<table>" in html and html.count("data:image/png;base64,") == 3 and "random-init" in html

    report = Path(result["report"]).read_text()
    assert "random-init" in report and "| mlm |" in report and "| clm |" in report
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    md = [a for a in artifacts if a.key == "pretrain-report"]
    assert md and md[0].type == "markdown" and "random-init" in md[0].data


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """`pretrain run` twice in a fresh workspace, as a user runs it (its own temporary Prefect server)."""
    tmp = tmp_path_factory.mktemp("cli")
    env = {"PRETRAIN_HOME": str(tmp / "workspace")}
    config = tiny_config(tmp)
    started = time.perf_counter()
    first = run_cli("run", "--config", str(config), env=env)
    first_s = time.perf_counter() - started
    started = time.perf_counter()
    second = run_cli("run", "--config", str(config), env=env)
    second_s = time.perf_counter() - started
    return {"env": env, "home": tmp / "workspace", "first": first, "second": second,
            "first_s": first_s, "second_s": second_s, "config": config}


def test_cli_run_reports_where_to_look(cli_runs):
    first = cli_runs["first"]
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout
    for needle in ("comparison", "mlm", "clm", "random-init", "MLflow experiment: pipeline-test", "Prefect flow run:",
                   "pretrain ui"):
        assert needle in out, needle
    assert "[7/" in first.stderr and "pretrain mlm" in first.stderr  # stage-by-stage progress


def test_second_run_is_served_from_cache(cli_runs):
    second = cli_runs["second"]
    assert second.returncode == 0, second.stderr[-3000:]
    assert "every stage served from cache" in second.stdout
    assert second.stderr.count("cached") >= 14
    assert cli_runs["second_s"] < 30, f"cached re-run took {cli_runs['second_s']:.1f} s"


def test_exported_models_load_with_transformers_auto_classes(cli_runs):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    runs = sorted((cli_runs["home"] / "runs").iterdir())
    loaded = {}
    for run in runs:
        hf = run / "hf"
        cfg = json.loads((hf / "config.json").read_text())
        auto = AutoModelForMaskedLM if cfg["model_type"] == "bert" else AutoModelForCausalLM
        model, tok = auto.from_pretrained(hf).eval(), AutoTokenizer.from_pretrained(hf)
        batch = tok(["Return the value of the named attribute of object."], return_tensors="pt")
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"]).logits
        assert logits.shape[-1] == 1000 and torch.isfinite(logits).all()
        loaded[cfg["model_type"]] = True
    assert loaded == {"bert": True, "gpt2": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, data: bytes | None = None) -> dict:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"{}")


def test_ui_serves_earlier_runs_on_loopback(cli_runs):
    pp, mp = _free_port(), _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--prefect-port", str(pp), "--mlflow-port", str(mp)],
                            cwd=ROOT, env={**os.environ, **cli_runs["env"]}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        lines = []
        while time.monotonic() < deadline and sum("UI" in ln for ln in lines) < 2:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
        assert f"http://127.0.0.1:{pp}" in "".join(lines) and f"http://127.0.0.1:{mp}" in "".join(lines), "".join(lines)
        flow_runs = _get(f"http://127.0.0.1:{pp}/api/flow_runs/filter", b"{}")
        assert sum(r["state_type"] == "COMPLETED" for r in flow_runs) >= 2
        exps = _get(f"http://127.0.0.1:{mp}/api/2.0/mlflow/experiments/search?max_results=10")
        assert "pipeline-test" in {e["name"] for e in exps["experiments"]}
        # the report's plots, shown in the Prefect UI, are served by the MLflow UI from the parent run
        images = _get(f"http://127.0.0.1:{pp}/api/artifacts/filter", b'{"artifacts": {"type": {"any_": ["image"]}}}')
        assert {a["key"] for a in images} >= {"report-loss-curves", "report-downstream", "report-finetune-curves"}
        for image in images:
            url = image["data"].replace("http://127.0.0.1:5000", f"http://127.0.0.1:{mp}")
            try:
                with urllib.request.urlopen(url, timeout=10) as r:
                    assert r.read(8) == b"\x89PNG\r\n\x1a\n", url
            except urllib.error.HTTPError as exc:
                leaked = {k: v for k, v in os.environ.items() if k.startswith(("PREFECT", "PRETRAIN", "MLFLOW"))}
                raise AssertionError(f"{url}: {exc}; image artefact {image}; this process's environment {leaked}; "
                                     f"the first run printed {cli_runs['first'].stdout[-1500:]}") from None
        listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
        for port in (pp, mp):
            binds = [ln.split()[3] for ln in listening.splitlines() if ln.split()[3].endswith(f":{port}")]
            assert binds and all(b.startswith("127.0.0.1:") for b in binds), binds
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.mark.parametrize("args,message", [
    (["run", "--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["run", "-c", "demo.yaml", "--set", "corpus.path=/no/such/folder"], "corpus path '/no/such/folder' does not exist"),
    (["run", "-c", "demo.yaml", "--set", "objectives=[mlm,xlnet]"], "unknown objective 'xlnet'"),
    (["run", "-c", "demo.yaml", "-o", "t5", "-o", "bert3"], "unknown objective 'bert3'"),
    (["run", "-c", "demo.yaml", "--set", "train.stepz=3"], "unknown config key 'train.stepz'"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, message):
    out = run_cli(*args, env={"PRETRAIN_HOME": str(tmp_path / "ws")}, timeout=120)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], out.stderr


def test_cli_lists_the_objectives():
    out = run_cli("objectives", env={"COLUMNS": "200"}, timeout=120)
    assert out.returncode == 0, out.stderr
    from model.objectives import OBJECTIVES

    listed = [line.split("│")[1].strip() for line in out.stdout.splitlines() if line.startswith("│")]
    assert [name for name in listed if name] == list(OBJECTIVES)


def test_cli_empty_corpus_is_one_line(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("")
    (corpus / "b.md").write_text("  \n")
    out = run_cli("run", "-c", str(tiny_config(tmp_path)), "--set", f"corpus.path={corpus}",
                  env={"PRETRAIN_HOME": str(tmp_path / "ws")}, timeout=300)
    assert out.returncode == 2
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out.stderr[-2000:]
    assert errors[0].startswith("error: the corpus is empty: 2 inputs gave no documents (2 empty after cleaning)")
    assert "Traceback" not in out.stderr and "leaked" not in out.stderr


def test_user_corpus_folder_runs(prefect_harness, workspace, tmp_path):
    from flows.pipeline import pretrain_pipeline

    corpus = write_corpus(tmp_path / "corpus", 120)
    result = pretrain_pipeline(config_path=str(tiny_config(tmp_path)), overrides=[
        f"corpus.path={corpus}", "corpus.name=mine", "objectives=[clm]", "train.max_steps=10",
        "corpus.val_frac=0.2"])
    assert set(result["runs"]) == {"clm", "random-init"}
    assert "| clm |" in Path(result["report"]).read_text()
    # The built-in task was read for evaluation, but only the user's documents were pretrained on.
    import duckdb

    from tasks.workspace import Workspace

    with duckdb.connect(str(Workspace.from_env().warehouse), read_only=True) as con:
        sources = con.execute("""SELECT DISTINCT p.source FROM snapshot_documents s JOIN provenance p USING (doc_id)
                                 WHERE s.snapshot_id = ?""", [result["snapshot_id"]]).fetchall()
    assert sources == [("mine",)]


def test_serve_registers_the_scheduled_deployment_and_stops_its_server(tmp_path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--cron", "*/5 * * * *", "--prefect-port",
                             str(port)], cwd=ROOT, env={**os.environ, "PRETRAIN_HOME": str(tmp_path / "ws")},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, seen = time.monotonic() + 120, ""
        while time.monotonic() < deadline and "being served" not in seen:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            seen += line
        assert "being served" in seen, seen[-2000:]
        deps = _get(f"http://127.0.0.1:{port}/api/deployments/filter", b"{}")
        (dep,) = [d for d in deps if d["name"] == "pretrain-pipeline"]
        assert dep["parameters"] == {"config_path": "demo.yaml", "overrides": []}
        assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["*/5 * * * *"]
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
    time.sleep(1)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)


OTHER_OBJECTIVES = ["mlm-static", "mlm-wwm", "nsp", "sop", "prefix-lm", "electra", "t5"]
HF_AUTO = {"bert": "AutoModelForPreTraining", "electra": "AutoModelForPreTraining", "gpt2": "AutoModelForCausalLM",
           "t5": "AutoModelForSeq2SeqLM"}


def test_every_objective_runs_through_the_flow_and_exports(prefect_harness, workspace, tmp_path):
    """Examples, training, MLflow logging and the Hugging Face export of every other objective."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from flows.pipeline import pretrain_pipeline
    from tasks.workspace import Workspace

    result = pretrain_pipeline(config_path=str(tiny_config(tmp_path)), overrides=[
        f"objectives=[{','.join(OTHER_OBJECTIVES)}]", "train.max_steps=4", "train.eval_interval=4",
        "train.static_copies=2", "downstream.task=none"])
    assert set(result["runs"]) == set(OTHER_OBJECTIVES)
    c = MlflowClient(tracking_uri=Workspace.from_env().mlflow_uri)
    for name, run_id in result["runs"].items():
        run = c.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params["objective"] == name
        assert run.data.metrics["val/loss"] > 0 and run.data.metrics["train/flops"] > 0
        assert c.list_artifacts(run_id, "examples")[0].path == "examples/sample.txt"
    exported = {}
    for run in (workspace / "runs").iterdir():
        hf = run / "hf"
        model_type = json.loads((hf / "config.json").read_text())["model_type"]
        model = getattr(transformers, HF_AUTO[model_type]).from_pretrained(hf).eval()
        ids = AutoTokenizer.from_pretrained(hf)(["Return the value of the named attribute."], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model(input_ids=ids, decoder_input_ids=ids[:, :1]) if model_type == "t5" else model(input_ids=ids)
        logits = out.logits if hasattr(out, "logits") and out.logits is not None else out.prediction_logits
        assert torch.isfinite(logits).all()
        exported[model_type] = exported.get(model_type, 0) + 1
    assert exported == {"bert": 4, "electra": 1, "gpt2": 1, "t5": 1}  # mlm-static, mlm-wwm, nsp, sop are BERTs
