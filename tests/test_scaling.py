"""The scaling-law study end to end, tiny: 5 sizes x 3 FLOP budgets on a small synthetic corpus
(prefect_test_harness, MLflow SQLite, DuckDB), one run made to fail and then retried; its config
checks and the command line's one-line errors."""
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli

SIZES = {"xs": {"n_layers": 1, "d_model": 8, "n_heads": 1, "d_ff": 32},
         "s": {"n_layers": 1, "d_model": 16, "n_heads": 1, "d_ff": 64},
         "m": {"n_layers": 1, "d_model": 32, "n_heads": 2, "d_ff": 128},
         "l": {"n_layers": 2, "d_model": 48, "n_heads": 2, "d_ff": 192},
         "xl": {"n_layers": 2, "d_model": 96, "n_heads": 2, "d_ff": 384}}
BUDGETS = [1.0e9, 3.0e9, 1.0e10]
LR = 0.01


def markov_corpus(folder: Path, n_docs: int = 160, seed: int = 0) -> Path:
    """Text from a Zipfian word-level Markov chain: a unigram to learn first and successors after it,
    so loss falls smoothly with size and steps (uniform random words would give a loss that jumps)."""
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnoprstuvw")
    words = sorted({"".join(rng.choice(letters, size=rng.integers(2, 7))) for _ in range(400)})[:300]
    p = 1 / np.arange(1, len(words) + 1)
    p /= p.sum()
    follow = rng.choice(len(words), size=(len(words), 4), p=p)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        w, out = rng.choice(len(words), p=p), []
        for _ in range(120):
            out.append(words[w])
            w = follow[w, rng.integers(4)] if rng.random() < 0.8 else rng.choice(len(words), p=p)
        (folder / f"doc{i:03d}.txt").write_text(" ".join(out) + ".")
    return folder


def tiny(tmp: Path) -> Path:
    cfg = {
        "experiment": "scaling-test",
        "scaling": {"objective": "clm", "sizes": SIZES, "budgets": BUDGETS, "n_boot": 20, "fit_starts": 8,
                    "require_interior": False, "max_parallel": 2},
        "corpus": {"path": str(markov_corpus(tmp / "corpus")), "val_frac": 0.2, "test_frac": 0.05},
        "tokenizer": {"vocab_size": 400},
        "train": {"seq_len": 32, "batch_size": 8, "lr": LR},
    }
    path = tmp / "scaling.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_study_runs_end_to_end_records_a_failed_run_and_retries_only_it(prefect_harness, workspace, tmp_path,
                                                                            monkeypatch):
    from prefect.client.orchestration import get_client

    from flows.pipeline import StudyIncomplete
    from flows.scaling import pretrain_scaling

    config = tiny(tmp_path)
    c = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    # The smallest model at the largest budget runs the most steps (over 1000; the next fewest, ~600):
    # the trainer's test hook makes it, and only it, crash at step 1000.
    monkeypatch.setenv("PRETRAIN_FAIL_AT", "0:1000")
    state = pretrain_scaling(config_path=str(config), return_state=True)
    assert state.is_failed()
    with pytest.raises(StudyIncomplete, match=r"1 part\(s\) of the study failed, the report lists them .* first: xs@1e10: TrainingFailed"):
        state.result()
    exp_id = c.get_experiment_by_name("scaling-test").experiment_id
    first = {r.info.run_name: r for r in c.search_runs([exp_id])}
    assert first["xs@1e10"].info.status == "FAILED" and "injected failure" in first["xs@1e10"].data.tags["error"]
    assert sum(r.info.status == "FINISHED" for r in first.values()) == 14
    (parent,) = [r for name, r in first.items() if name.startswith("scaling-")]
    assert parent.info.status == "FAILED"  # the study is incomplete, its report is written all the same
    report = (workspace / "reports" / parent.info.run_id / "report.md").read_text()
    assert "14 of 15 runs finished" in report and re.search(r"\| xs@1e10 \|.*\| failed: .*injected failure", report)

    monkeypatch.delenv("PRETRAIN_FAIL_AT")
    result = pretrain_scaling(config_path=str(config))
    assert [s for s in result["ran_stages"] if s.startswith("pretrain")] == ["pretrain xs@1e10"]  # the rest: cache
    runs = {r["name"]: r for r in result["runs"]}
    assert len(runs) == 15 and not any(r.get("error") for r in runs.values())

    children = {r.info.run_name: r for r in c.search_runs(
        [exp_id], f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")}
    assert set(children) == set(runs)
    n_by_size = {}
    for name, run in children.items():
        m, p, r = run.data.metrics, run.data.params, runs[name]
        assert run.info.status == "FINISHED"
        assert m["scaling/N"] == r["N"] and m["scaling/D"] == r["D"] and m["scaling/C"] == r["C"]
        assert m["scaling/loss"] == pytest.approx(r["loss"]) and 0 < r["loss"] < math.log(400) + 1
        # Stopped at the budget by the trainer's own count: within one step of it, never over.
        per_step = r["flops_per_token"] * 8 * 32
        assert r["budget"] - per_step < r["C"] <= r["budget"] and r["D"] == r["steps"] * 8 * 32
        assert int(p["warmup_steps"]) == max(1, round(0.1 * r["steps"]))
        n_by_size.setdefault(r["size"], set()).add(r["N"])
    assert all(len(v) == 1 for v in n_by_size.values())
    ns = sorted(v.pop() for v in n_by_size.values())
    assert ns == sorted(result["models"][s]["N"] for s in SIZES) and ns[-1] / ns[0] > 30
    # Each run's schedule is its own: warmup, then cosine down to 10% of the learning rate at its last step.
    for name in ("xs@1e10", "m@1e09", "xl@3e09"):
        lrs = [x.value for x in sorted(c.get_metric_history(children[name].info.run_id, "train/lr"), key=lambda x: x.step)]
        assert lrs[-1] == pytest.approx(0.1 * LR, rel=1e-6) and max(lrs) <= LR * (1 + 1e-6)
    assert "trained_in_run" not in children["xs@1e10"].data.tags  # trained now, under this run
    # The others came from the cache: each points at the run of the first flow run that trained it.
    assert children["m@1e09"].data.tags["trained_in_run"] == first["m@1e09"].info.run_id

    artefacts = {a.path for a in c.list_artifacts(result["parent_run_id"])}
    plots = {"loss_vs_flops.png", "isoflop.png", "parametric_fit.png"}
    assert plots | {"report.md", "report.html", "runs.csv", "fits.json", "scaling_config.json"} <= artefacts
    for p in result["plots"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(p).stat().st_size > 10_000
    report = Path(result["report"]).read_text()
    number = r"-?\d+\.\d{3} \[-?\d+\.\d{3}, -?\d+\.\d{3}\]"
    for label in (r"a in N_opt ~ C\^a", r"b in D_opt ~ C\^b", "alpha", "beta"):
        assert re.search(rf"\| {label} \| \*\*{number}\*\* \|", report), label
    found = re.search(r"a prediction error of \*\*([+-]\d+\.\d{2})%\*\* of the loss", report)
    fits = result["fits"]
    assert found and float(found.group(1)) == pytest.approx(100 * fits["extrapolation"]["relative_error"], abs=0.006)
    assert fits["extrapolation"]["n"] == ns[-1] and fits["extrapolation"]["budget"] == max(BUDGETS)
    assert "## What these runs can and cannot show" in report and "Hoffmann et al. 2022" in report
    metrics = c.get_run(result["parent_run_id"]).data.metrics
    assert {"frontier/a", "frontier/b", "parametric/alpha", "parametric/beta", "extrapolation/relative_error"} <= set(metrics)
    with get_client(sync_client=True) as client:
        artefacts = {a.key: a for a in client.read_artifacts() if a.key and a.key.startswith("scaling-")}
    assert artefacts["scaling-report"].type == "markdown" and "# Scaling laws" in artefacts["scaling-report"].data
    assert {"scaling-loss-vs-flops", "scaling-isoflop", "scaling-parametric-fit"} <= set(artefacts)


def test_the_shipped_configs_are_grids_the_fits_can_use():
    from flows.scaling import load_scaling_config, measure, size_config
    from model.config import TrainConfig

    for name in ("studies/scaling.yaml", "studies/scaling-gpu.yaml"):
        sc, cfg = load_scaling_config(name)
        tc = TrainConfig(objective=sc.objective, seq_len=int(cfg.train["seq_len"]))
        ns = [measure(sc.objective, size_config(cfg, "decoder", cfg.tokenizer.vocab_size, k, v), tc)["N"]
              for k, v in sc.sizes.items()]
        assert len(ns) >= 5 and max(ns) / min(ns) >= 30, (name, ns)
        assert len(sc.budgets) >= 3 and cfg.downstream.task == "none" and cfg.objectives == [sc.objective]
    assert "/site-packages/" in cfg.corpus.sources[1].path  # $SITE_PACKAGES, as in the strategies config


@pytest.mark.parametrize("override,message", [
    ("scaling.budgets=[1.0e12]", "needs at least 2 different positive FLOP budgets"),
    ("scaling.objective=t5", "scaling.objective=t5 trains an encoder and a decoder"),
    ("scaling.sizes.bad={n_layers: 1, d_model: 8}", "scaling.sizes.bad must be a size name"),
    ("scaling.sizes.bad={n_layers: 1, d_model: 9, n_heads: 2, d_ff: 8}", "scaling.sizes.bad: model.d_model=9 is not divisible"),
    ("scaling.sizes.bad={n_layers: 1, d_model: 8, n_heads: 1, d_ff: 8, depth: 3}", "'scaling.sizes.bad.depth'"),
    ("scaling.sizes.bad=huge", "scaling.sizes.bad: model size 'huge' is unknown"),
    ("scaling.warmup_frac=1.5", "scaling.warmup_frac=1.5 must be in [0, 1)"),
    ("scaling.isoflop_window=2", "scaling.isoflop_window=2 must be 0 (every size) or at least 3"),
    ("scaling.budgetz=[1]", "unknown config key 'scaling.budgetz'"),
    ("train.max_flops=1.0e12", "train.max_flops is set by scaling.budgets"),
    ("train.warmup_steps=10", "train.warmup_steps is set by scaling.warmup_frac"),
    ("model.size=tiny", "model.size is set by scaling.sizes"),
    ("downstream.task=word-order", "downstream is set by nothing: a scaling study fine-tunes nothing"),
    ("train.stepz=3", "unknown config key 'train.stepz'"),
])
def test_a_bad_scaling_config_is_one_clear_line(override, message):
    from flows.scaling import load_scaling_config
    from model.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_scaling_config("studies/scaling.yaml", [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_config_without_a_scaling_section_says_where_to_look():
    from flows.scaling import load_scaling_config
    from model.config import ConfigError

    with pytest.raises(ConfigError, match=r"has no `scaling:` section; see configs/studies/scaling.yaml"):
        load_scaling_config("demo.yaml")


def test_cli_bad_key_or_missing_config_is_one_line(prefect_harness, tmp_path):
    from prefect.settings import PREFECT_API_URL

    env = {"PRETRAIN_HOME": str(tmp_path / "ws"), "PREFECT_API_URL": PREFECT_API_URL.value()}
    for args, message in ((["--set", "scaling.budgetz=[1.0e12]"], "unknown config key 'scaling.budgetz'"),
                          (["--config", "nope.yaml"], "config file 'nope.yaml' does not exist")):
        out = run_cli("scale", *args, env=env, timeout=120)
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
