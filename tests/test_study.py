"""The comparison study, for real: a failing part reported while the rest completes, a user's pair
task with several fine-tuning methods in parallel, contamination, and `pretrain compare`."""
import csv
import json
import random
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli, write_corpus
from tests.test_pipeline import TINY

FAST_TRAIN = {**TINY["train"], "max_steps": 20, "eval_interval": 10}


def study_config(folder: Path, **changes) -> Path:
    cfg = {**TINY, "experiment": "study-test", "train": FAST_TRAIN, **changes}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def runs_by_name(home: Path, experiment: str) -> dict:
    c = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = c.get_experiment_by_name(experiment)
    return {r.info.run_name: r for r in c.search_runs([exp.experiment_id])}


def test_compare_reports_failed_parts_and_finishes_the_rest(tmp_path):
    home = tmp_path / "ws"
    # t5 needs more sentinels than this tokenizer has: its pretraining fails at the examples stage.
    # freeze-9 asks for more frozen layers than the models have: each of its cells fails.
    config = study_config(tmp_path, objectives=["clm", "t5"], tokenizer={"vocab_size": 1000, "sentinels": 2},
                          downstream={"n_classes": 4, "seeds": [0, 1], "finetune": {"epochs": 1, "max_len": 64},
                                      "methods": {"full": {}, "freeze-9": {"method": "freeze", "freeze_layers": 9}}},
                          study={"sizes": ["tiny", "mini"]})
    done = run_cli("compare", "--config", str(config), env={"PRETRAIN_HOME": str(home)})
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "StudyIncomplete" in errors[0] and "tokenizer.sentinels" in errors[0], done.stderr[-3000:]

    (report_dir,) = (home / "reports").iterdir()
    report = (report_dir / "report.md").read_text()
    for size in ("tiny", "mini"):
        assert f"| t5@{size} | t5 | {size} |" in report and f"| clm@{size} | clm | {size} |" in report
        assert f"| clm@{size} | full | 0.0003 | 2/2 |" in report and f"| random-init@{size} | full | 0.0003 | 2/2 |" in report
        assert f"| clm@{size} | freeze-9 | - | 0/2 |" in report and f"| t5@{size} | full | - | 0/2 |" in report
    assert "failed: span corruption needs" in report and "freeze_layers=9 but the model has 2 layers" in report
    assert "freeze_layers=9 but the model has 4 layers" in report  # mini
    assert (report_dir / "report.html").exists() and (report_dir / "downstream.png").stat().st_size > 0

    runs = runs_by_name(home, "study-test")
    assert runs["t5@tiny"].info.status == "FAILED" and "sentinels" in runs["t5@tiny"].data.tags["error"]
    assert runs["clm@mini"].info.status == "FINISHED" and runs["clm@mini"].data.params["model_size"] == "mini"
    assert runs["clm@mini"].data.metrics["n_params"] > runs["clm@tiny"].data.metrics["n_params"]
    for seed in (0, 1):
        ok, bad = runs[f"clm@tiny/full/s{seed}"], runs[f"clm@mini/freeze-9/s{seed}"]
        assert ok.info.status == "FINISHED" and 0 <= ok.data.metrics["test/accuracy"] <= 1
        assert bad.info.status == "FAILED" and "freeze_layers" in bad.data.tags["error"]
        assert runs[f"t5@mini/full/s{seed}"].info.status == "FAILED"
    assert [r.info.status for n, r in runs.items() if n.startswith("pipeline-")] == ["FAILED"]
    assert "downstream/stdlib-module/full/accuracy_ci95" in runs["clm@tiny"].data.metrics  # two seeds: an interval


def _pair_task(folder: Path, corpus: Path) -> Path:
    """Text pairs labelled by whether both halves talk about the same subject; one test example leaks into the corpus."""
    rng = random.Random(1)
    topics = {"fruit": "apple pear plum cherry grape melon lemon", "tools": "hammer saw drill wrench chisel file clamp",
              "sky": "cloud rain storm wind sun snow thunder"}
    rows = []
    for i in range(180):
        a, b = rng.sample(list(topics), 2)
        first = rng.choice([a, b])
        second = first if i % 2 == 0 else ({a, b} - {first}).pop()
        text = " ".join(rng.choice(topics[first].split()) for _ in range(10)) + f" item {i}"
        pair = " ".join(rng.choice(topics[second].split()) for _ in range(10))
        split = "train" if i < 120 else "validation" if i < 150 else "test"
        rows.append({"sentence": text, "other": pair, "same": "yes" if first == second else "no", "part": split})
    path = folder / "pairs.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["sentence", "other", "same", "part"])
        writer.writeheader()
        writer.writerows(rows)
    leaked = f"{rows[-1]['sentence']} {rows[-1]['other']}"
    (corpus / "leak.txt").write_text(f"Some words before the copied example. {leaked}. And a sentence after it.")
    return path


@pytest.mark.usefixtures("prefect_harness")
def test_study_on_a_user_pair_task_runs_methods_in_parallel_and_checks_contamination(tmp_path, workspace):
    from flows.pipeline import pretrain_pipeline

    corpus = write_corpus(tmp_path / "corpus", n_docs=90)
    task = _pair_task(tmp_path, corpus)
    config = study_config(tmp_path, objectives=["mlm"], corpus={"path": str(corpus), "val_frac": 0.1, "test_frac": 0.1},
                          downstream={"task": "same-subject", "path": str(task), "text_column": "sentence",
                                      "text_pair_column": "other", "label_column": "same", "split_column": "part",
                                      "seeds": [0, 1], "contamination_n": 5, "finetune": {"epochs": 2, "max_len": 64},
                                      "methods": {"probe": {"lr_grid": [0.001, 0.03], "epochs": 5}, "lora": {"lr": 0.003}}},
                          study={"max_parallel": 2})
    result = pretrain_pipeline(config_path=str(config))
    runs = runs_by_name(workspace, "study-test")
    cells = [n for n in runs if n.count("/") >= 2]
    assert sorted(cells) == sorted([f"{v}/lora/s{s}" for v in ("mlm", "random-init") for s in (0, 1)]
                                   + [f"{v}/probe/lr{lr}/s{s}" for v in ("mlm", "random-init") for lr in ("0.001", "0.03")
                                      for s in (0, 1)])
    assert all(runs[n].info.status == "FINISHED" for n in cells)
    assert runs["mlm/lora/s0"].data.params["trainable_params"] != runs["mlm/probe/lr0.03/s0"].data.params["trainable_params"]
    mlm = runs["mlm"].data.metrics
    assert {"downstream/same-subject/probe/accuracy", "downstream/same-subject/lora/mcc"} <= set(mlm)
    # the probe's learning rate is the one with the best mean validation accuracy, and only its cells count
    val = {lr: sum(runs[f"mlm/probe/lr{lr}/s{s}"].data.metrics["validation/accuracy"] for s in (0, 1)) for lr in ("0.001", "0.03")}
    best = max(sorted(val, key=float), key=lambda lr: val[lr])
    assert mlm["downstream/same-subject/probe/lr"] == float(best)
    assert {runs[f"mlm/probe/lr{lr}/s0"].data.tags["lr_selected"] for lr in val} == {"true", "false"}
    assert runs[f"mlm/probe/lr{best}/s0"].data.tags["lr_selected"] == "true"
    test_mean = sum(runs[f"mlm/probe/lr{best}/s{s}"].data.metrics["test/accuracy"] for s in (0, 1)) / 2
    assert mlm["downstream/same-subject/probe/accuracy"] == pytest.approx(test_mean)

    report = Path(result["report"]).read_text()
    assert "Task `same-subject`: 2 classes; 120 / 30 / 30" in report
    contamination = report.split("**Contamination**")[1].split("\n\n")[1]
    test_row = next(ln for ln in contamination.splitlines() if ln.startswith("| test |"))
    assert "| test | 30 | 5 |" in test_row and "| 1 (3.3%) |" in test_row  # the one leaked test example
    assert "| validation | 30 | 5 | 0.000 | 0 (0.0%) |" in contamination
    with open(Path(result["report"]).parent / "pairwise_tests.csv") as f:
        pairs = list(csv.DictReader(f))
    assert {(p["method"], p["a"], p["b"]) for p in pairs} == {("probe", "mlm", "random-init"), ("lora", "mlm", "random-init")}
    assert json.loads(json.dumps(result["table"]))[0]["variant"] == "mlm"

    # the cells are task runs of this flow run in Prefect, named after their cell
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[result["flow_run_id"]])))
    names = {t.name for t in task_runs if t.name.startswith("finetune-")}
    assert {"finetune-mlm/lora-s0", "finetune-random-init/probe/lr0.03-s1"} <= names and len(names) == 12
