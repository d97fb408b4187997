"""Pretraining strategies end to end, tiny: static, domain-only, general -> domain, general -> domain -> task,
fine-tuned with two seeds beside a random-init floor (prefect_test_harness, MLflow SQLite, DuckDB)."""
import csv
import random
import re
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

GENERAL = "data model token train layer attention mask predict sentence corpus the a of to and".split()
DOMAIN = "python function value return object module class method string list the a of to and".split()


def corpus(folder: Path, words: list[str], n: int, seed: int) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"doc{i:03d}.txt").write_text(" ".join(" ".join(rng.choice(words) for _ in range(12)) + "."
                                                         for _ in range(6)))
    return folder


def task_file(path: Path) -> Path:
    """In the domain's words: is a text about functions or about classes?"""
    rng = random.Random(7)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(80):
            label = ("function", "class")[i % 2]
            words = [label] * 3 + [rng.choice(DOMAIN) for _ in range(14)]
            rng.shuffle(words)
            w.writerow([" ".join(words), label])
    return path


def tiny(tmp: Path) -> Path:
    cfg = {
        "experiment": "strategies-test",
        "strategies": {
            "general": [{"name": "general-texts", "path": str(corpus(tmp / "general", GENERAL, 40, 1))}],
            "domain": [{"name": "domain-texts", "path": str(corpus(tmp / "domain", DOMAIN, 40, 2))}],
            "objective": "clm", "size": "tiny", "steps": {"general": 6, "domain": 4, "task": 2},
            "equal_compute": False, "init_optimizer": "fresh"},
        "corpus": {"val_frac": 0.2, "test_frac": 0.05},
        "tokenizer": {"vocab_size": 400},
        "train": {"seq_len": 32, "batch_size": 8, "warmup_steps": 1, "eval_interval": 2, "eval_batches": 2,
                  "log_interval": 2},
        "downstream": {"task": "topic", "path": str(task_file(tmp / "task.csv")), "seeds": [0, 1],
                       "finetune": {"epochs": 1, "max_len": 32, "batch_size": 16}},
    }
    path = tmp / "strategies.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_strategies_run_end_to_end_with_shared_phases_intervals_and_a_report(prefect_harness, workspace, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.strategies import pretrain_strategies

    result = pretrain_strategies(config_path=str(tiny(tmp_path)))
    v = result["variants"]
    assert list(v) == ["static", "domain-only", "general-domain", "general-domain-task", "random-init"]
    steps = {name: (x["summary"]["init_step"], x["summary"]["steps"]) for name, x in v.items() if x["summary"]}
    assert steps == {"static": (0, 6), "domain-only": (0, 4), "general-domain": (6, 10), "general-domain-task": (10, 12)}
    # The general phase is trained once for the three variants that start with it, the domain phase once for two.
    assert v["static"]["phase_dirs"][0] == v["general-domain"]["phase_dirs"][0] == v["general-domain-task"]["phase_dirs"][0]
    assert v["general-domain"]["phase_dirs"][1] == v["general-domain-task"]["phase_dirs"][1]
    assert v["domain-only"]["phase_dirs"][0] != v["general-domain"]["phase_dirs"][1]  # from scratch, not from general
    for name in ("static", "domain-only", "general-domain", "general-domain-task"):
        assert set(v[name]["heldout"]) == {"general", "domain", "task"} and all(x > 0 for x in v[name]["heldout"].values())
    assert result["corpora"]["task"]["documents"] > 0 and result["corpora"]["task"]["snapshot_id"] == ""

    c = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in c.search_runs([result["experiment_id"]])}
    for name in ("static", "general-domain-task", "random-init"):
        run = runs[name]
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == result["parent_run_id"]
        m = run.data.metrics
        assert 0 <= m["downstream/topic/full/accuracy"] <= 1 and "downstream/topic/full/accuracy_ci95" in m
        assert runs[f"{name}/full/s1"].data.tags["mlflow.parentRunId"] == run.info.run_id
    assert runs["general-domain-task"].data.params["phases"] == "general (6) -> domain (4) -> task (2)"
    assert runs["general-domain-task"].data.metrics["heldout/task/loss"] > 0
    # The curve of a chain runs on over its phases: the shared general phase's steps are there too.
    steps_logged = [m.step for m in c.get_metric_history(runs["general-domain-task"].info.run_id, "train/loss")]
    assert steps_logged == [2, 4, 6, 8, 10, 12]
    artefacts = {a.path for a in c.list_artifacts(result["parent_run_id"])}
    assert {"report.md", "report.html", "heldout_loss.png", "downstream.png", "loss_curves.png",
            "pairwise_tests.csv", "tokenizer.json"} <= artefacts

    report = Path(result["report"]).read_text()
    assert "| general-domain-task | general (6) -> domain (4) -> task (2) |" in report
    assert re.search(r"\| static \| full \| 0\.0003 \| 2/2 \| \d\.\d{3} ± \d\.\d{3} \|", report), report
    assert "random-init" in report and "## Downstream" in report
    with get_client(sync_client=True) as client:
        (md,) = [a for a in client.read_artifacts() if a.key == "strategies-report"]
    assert md.type == "markdown" and "general-domain-task" in md.data


def test_equal_compute_lengthens_the_last_phase_and_bad_configs_are_one_clear_error():
    from flows.strategies import load_strategies_config
    from model.config import ConfigError

    sc, cfg = load_strategies_config("studies/strategies.yaml")
    plans = sc.plans()
    assert {name: sum(n for _, n in plan) for name, plan in plans.items()} == dict.fromkeys(plans, 700)
    assert plans["general-domain"] == [("general", 400), ("domain", 300)]
    assert plans["general-domain-task"] == [("general", 400), ("domain", 200), ("task", 100)]
    assert "/site-packages/" in sc.general[0].path and cfg.objectives == ["clm"]
    for override, message in [
        ("strategies.variants={x: [general, web]}", "strategies.variants.x: unknown phase 'web'"),
        ("strategies.domain=[{name: packages, builtin: python-docs}]", "source 'packages' is in both"),
        ("strategies.steps.domain=0", "strategies.steps.domain=0 must be a positive number"),
        ("train.max_steps=5", "train.max_steps is set by strategies.steps"),
        ("downstream.task=none", "a variant has a task phase but downstream.task is none"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_strategies_config("studies/strategies.yaml", [override])
