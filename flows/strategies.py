"""Pretraining strategies compared: `pretrain-strategies` (`pretrain strategies --config ...`).

Static pretraining on a general corpus, domain-only pretraining, and hybrid chains: general, then
domain-adaptive pretraining on a second corpus, then task-adaptive pretraining on the downstream
task's own unlabelled training texts (Gururangan et al., 2020, "Don't Stop Pretraining"). Every
variant is a list of phases; each phase continues the previous one's checkpoint (`train.init_from`:
steps, tokens and FLOPs count on, the learning rate warms up again). With `equal_compute` every
variant trains for the same number of steps (its last phase is lengthened), so the comparison is at
equal compute. Phases two variants share (the general phase of general -> domain and of general ->
domain -> task) are trained once: the pretrain task is cached on its inputs.

Each variant (and a random-init floor) is fine-tuned on the downstream task with several seeds; the
report has the downstream scores (mean ± 95% interval, paired tests), each variant's held-out loss
on every corpus (what domain adaptation costs on general text: forgetting), and the plots, in the
MLflow parent run and as Prefect artefacts.
"""
from __future__ import annotations

import copy
import json
import math
import os
import string
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact
from prefect.runtime import flow_run

from flows.config import PipelineConfig, config_hash, read_study_sections
from flows.pipeline import Stages, parent_run, snapshot_stages
from model.config import SIZES, ConfigError, TrainConfig, load_dataclass, run_identity, to_dict
from model.objectives import EXAMPLE_KEYS, OBJECTIVES, get_objective, preset
from tasks import report as reporting
from tasks.caching import run_stage, stage_cache_key
from tasks.workspace import Workspace, git_commit
from warehouse.sources import SourceSpec

PHASES = ("general", "domain", "task")
DEFAULT_VARIANTS = {"static": ["general"], "domain-only": ["domain"], "general-domain": ["general", "domain"],
                    "general-domain-task": ["general", "domain", "task"]}
CACHED = dict(persist_result=True, result_serializer="json")


@dataclass
class StrategiesConfig:
    """The `strategies:` section; the rest of the file is a pipeline config (corpus, tokenizer, train, downstream)."""

    general: list[SourceSpec] = field(default_factory=list)  # warehouse sources of the general corpus
    domain: list[SourceSpec] = field(default_factory=list)  # ... and of the domain corpus (the task's domain)
    objective: str = "clm"
    size: str = "tiny"
    steps: dict[str, int] = field(default_factory=lambda: {"general": 400, "domain": 200, "task": 100})
    variants: dict[str, list[str]] = field(default_factory=lambda: copy.deepcopy(DEFAULT_VARIANTS))
    equal_compute: bool = True  # every variant trains as many steps as the longest: its last phase is lengthened
    init_optimizer: str = "fresh"  # a phase starts with fresh AdamW moments, or the previous phase's (restore)
    floor: bool = True  # fine-tune a randomly initialised model too

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"strategies.objective={self.objective!r} is unknown; use one of {', '.join(OBJECTIVES)}")
        if self.size not in SIZES:
            raise ConfigError(f"strategies.size={self.size!r} is unknown; use one of {', '.join(SIZES)}")
        for corpus in ("general", "domain"):
            if not getattr(self, corpus):
                raise ConfigError(f"strategies.{corpus} lists no sources; name the warehouse sources of the {corpus} "
                                  f"corpus, e.g. [{{name: mine, path: texts/}}]")
        clash = {s.name for s in self.general} & {s.name for s in self.domain}
        if clash:
            raise ConfigError(f"source {sorted(clash)[0]!r} is in both strategies.general and strategies.domain; "
                              "the two corpora must be different sources")
        for phase, n in self.steps.items():
            if phase not in PHASES:
                raise ConfigError(f"strategies.steps.{phase} is not a phase; phases are {', '.join(PHASES)}")
            if not isinstance(n, int) or n < 1:
                raise ConfigError(f"strategies.steps.{phase}={n!r} must be a positive number of steps")
        if not self.variants:
            raise ConfigError("strategies.variants is empty; e.g. {static: [general], general-domain: [general, domain]}")
        for name, phases in self.variants.items():
            if not phases or not isinstance(phases, list):
                raise ConfigError(f"strategies.variants.{name} must be a list of phases, e.g. [general, domain]")
            for p in phases:
                if p not in PHASES:
                    raise ConfigError(f"strategies.variants.{name}: unknown phase {p!r}; phases are {', '.join(PHASES)}")
                if p not in self.steps:
                    raise ConfigError(f"strategies.variants.{name} uses phase {p!r} but strategies.steps.{p} is not set")
        if self.init_optimizer not in ("restore", "fresh"):
            raise ConfigError(f"strategies.init_optimizer={self.init_optimizer!r} is unknown; use restore or fresh")

    def plans(self) -> dict[str, list[tuple[str, int]]]:
        """Each variant's phases with their steps; at equal compute the last phase takes up the difference."""
        plans = {name: [(p, self.steps[p]) for p in phases] for name, phases in self.variants.items()}
        if self.equal_compute:
            budget = max(sum(n for _, n in plan) for plan in plans.values())
            for plan in plans.values():
                last, n = plan[-1]
                plan[-1] = (last, n + budget - sum(k for _, k in plan))
        return plans


OWNED = {("objectives",): "strategies.objective", ("model", "size"): "strategies.size",
         ("train", "max_steps"): "strategies.steps", ("train", "max_flops"): "strategies.steps",
         ("train", "init_from"): "the previous phase (automatic)", ("train", "init_optimizer"): "strategies.init_optimizer",
         ("corpus", "sources"): "strategies.general / strategies.domain",
         ("corpus", "path"): "strategies.general / strategies.domain"}


def _placeholders(path: str, ws: Workspace) -> str:
    """$PRETRAIN_HOME (the workspace) and $SITE_PACKAGES (this interpreter's installed packages) in a path."""
    values = {**os.environ, "PRETRAIN_HOME": str(ws.root), "SITE_PACKAGES": sysconfig.get_paths()["purelib"]}
    return string.Template(path).safe_substitute(values)


def load_strategies_config(path: str | Path, overrides: list[str] | None = None) -> tuple[StrategiesConfig, PipelineConfig]:
    section, data = read_study_sections(path, overrides or [], "strategies", OWNED)
    sc = load_dataclass(StrategiesConfig, section, "strategies.")
    ws = Workspace.from_env()
    for s in sc.general + sc.domain:
        s.path = _placeholders(s.path, ws) if s.path else s.path
    d = copy.deepcopy(data)
    d.setdefault("experiment", "pretrain-strategies")
    d["objectives"] = [sc.objective]
    d.setdefault("model", {})["size"] = sc.size
    corpus = d.setdefault("corpus", {})
    corpus["sources"] = [asdict(s) for s in sc.general + sc.domain]
    corpus.setdefault("name", "strategies")
    cfg = load_dataclass(PipelineConfig, d).validate()
    if cfg.downstream.task == "none" and any("task" in phases for phases in sc.variants.values()):
        raise ConfigError("a variant has a task phase but downstream.task is none; task-adaptive pretraining "
                          "trains on the downstream task's texts: configure the task or drop the phase")
    return sc, cfg


@flow(name="pretrain-strategies", log_prints=True)
def pretrain_strategies(config_path: str = "studies/strategies.yaml", overrides: list[str] | None = None) -> dict:
    """Static vs domain-adaptive vs task-adaptive pretraining, fine-tuned with seeds, in one report."""
    sc, cfg = load_strategies_config(config_path, overrides or [])
    ws = Workspace.from_env()
    logger = get_run_logger()
    with parent_run(ws, cfg.experiment, "strategies", config_path, logger) as (c, exp_id, parent):
        return _run(sc, cfg, ws, c, exp_id, parent, logger)


def _run(sc: StrategiesConfig, cfg: PipelineConfig, ws: Workspace, c, exp_id: str, parent: str, logger) -> dict:
    from flows.continual import heldout_loss
    from flows.matrix import log_cell, log_variant_summary, run_cells
    from tasks.data import make_examples, snapshot_corpus, tokenize_snapshot, tokenizer_for
    from tasks.tracking import log_dict, log_metrics, log_params
    from warehouse.shards import file_sha256

    db = str(ws.warehouse)
    has_task = cfg.downstream.task != "none"
    plans = sc.plans()
    methods = cfg.downstream.method_configs()
    per_model = sum(len(ft.lr_grid) or 1 for ft in methods.values()) * len(cfg.downstream.seeds)
    used = [p for p in PHASES if any(p == q for plan in plans.values() for q, _ in plan)]
    # One line per stage: ingest, task, snapshot, tokenizer; per corpus snapshot, shards, examples (task texts:
    # two); each variant's phases and held-out losses; the fine-tuning cells; the report.
    stages = Stages(3 + has_task + sum(2 if p == "task" else 3 for p in used) + sum(len(p) for p in plans.values())
                    + len(plans) + (per_model * (len(plans) + sc.floor) if has_task else 0) + 1)

    union, task_info = snapshot_stages(cfg, db, stages, has_task)
    tok_cfg = asdict(cfg.tokenizer)
    tok_dir = ws.stage_dir("tokenizers", f"{union['snapshot_id']}-{config_hash(tok_cfg)}")
    tok, cached = run_stage(tokenizer_for, db_path=db, snapshot_id=union["snapshot_id"], config=tok_cfg,
                            out_path=str(tok_dir / "tokenizer.json"))
    stages.done("tokenizer", cached, f"on both corpora: {cfg.tokenizer.kind}, vocab {tok['vocab_size']:,}")

    obj = get_objective(sc.objective)
    base = load_dataclass(TrainConfig, preset(sc.objective, cfg.train))
    base.objective, base.specials = sc.objective, tok["specials"]
    base.model = cfg.model_config(obj.ARCH, tok["vocab_size"], sc.size)
    base.init_optimizer = sc.init_optimizer
    example_config = {k: getattr(base, k) for k in (*EXAMPLE_KEYS, "specials")}

    corpora: dict[str, dict] = {}  # phase -> snapshot / texts, shards and examples
    for phase in used:
        if phase == "task":
            shard_dir = ws.stage_dir("shards", f"task-{task_info['name']}-{config_hash([task_info, tok['path']])}")
            shards, cached = run_stage(task_text_shards, db_path=db, task_name=task_info["name"],
                                       tokenizer_path=tok["path"], out_dir=str(shard_dir), task_key=config_hash(task_info))
            what = {"what": f"task `{task_info['name']}` unlabelled train texts", "snapshot_id": "",
                    "documents": shards["splits"]["train"]["documents"]}
            stages.done("task texts", cached, f"{what['documents']} unlabelled training texts")
        else:
            specs = sc.general if phase == "general" else sc.domain
            snap, cached = run_stage(snapshot_corpus, db_path=db, name=phase, sources=[s.name for s in specs],
                                     val_frac=cfg.corpus.val_frac, test_frac=cfg.corpus.test_frac,
                                     near_dup=asdict(cfg.corpus.near_dup),
                                     upstream_key=config_hash([union["snapshot_id"], task_info]))
            stages.done(f"snapshot {phase}", cached, f"{snap['snapshot_id']}: {snap['splits']}")
            shard_dir = ws.stage_dir("shards", f"{snap['snapshot_id']}-tok{config_hash(tok['path'])[:8]}")
            shards, cached = run_stage(tokenize_snapshot, db_path=db, snapshot_id=snap["snapshot_id"],
                                       tokenizer_path=tok["path"], out_dir=str(shard_dir))
            stages.done(f"token shards {phase}", cached,
                        ", ".join(f"{s} {v['tokens']:,}" for s, v in shards["splits"].items()))
            what = {"what": ", ".join(s.name for s in specs), "snapshot_id": snap["snapshot_id"],
                    "documents": snap["n_documents"]}
        ex_dir = ws.stage_dir("examples", f"{sc.objective}-{config_hash(example_config)}-{Path(shard_dir).name}")
        examples, cached = run_stage(make_examples, train_config=example_config, shard_dir=str(shard_dir),
                                     tokenizer_path=tok["path"], out_dir=str(ex_dir))
        stages.done(f"examples {phase}", cached, f"rows {examples['rows']}")
        if not examples["rows"]["validation"]:
            raise ConfigError(f"the {phase} corpus's validation split makes no example of train.seq_len="
                              f"{base.seq_len} tokens; raise corpus.val_frac or lower train.seq_len")
        val_rows = ex_dir / "validation.npy"
        corpora[phase] = {**what, "examples": str(ex_dir), "rows": examples["rows"],
                          "train_tokens": shards["splits"]["train"]["tokens"], "validation": str(val_rows),
                          "validation_digest": file_sha256(val_rows)}
    log_params(c, parent, {"objective": sc.objective, "model_size": sc.size, "tokenizer_snapshot": union["snapshot_id"],
                           "equal_compute": sc.equal_compute, "init_optimizer": sc.init_optimizer,
                           **{f"steps_{p}": n for p, n in sc.steps.items()},
                           **{f"{p}_snapshot_id": x["snapshot_id"] for p, x in corpora.items() if x["snapshot_id"]},
                           **{f"{p}_train_tokens": x["train_tokens"] for p, x in corpora.items()}})
    log_dict(c, parent, {"strategies": asdict(sc), "pipeline": asdict(cfg)}, "strategies_config.json")
    c.log_artifact(parent, tok["path"])
    base_tags = {"snapshot_id": union["snapshot_id"], "git_commit": git_commit()}

    variants = []
    for name, plan in plans.items():
        variants.append(_train_variant(sc, ws, c, exp_id, parent, name, plan, base, corpora, tok, base_tags, stages))
    for v in variants:  # what each variant's final model knows of each corpus; general text: forgetting
        v["heldout"] = {}
        for phase, corpus in corpora.items():
            loss, _ = run_stage(heldout_loss, checkpoint=v["checkpoint"], checkpoint_digest=_digest(v["checkpoint"]),
                                rows_path=corpus["validation"], rows_digest=corpus["validation_digest"],
                                batch_size=base.batch_size)
            v["heldout"][phase] = loss["val/loss"]
        log_metrics(c, v["run_id"], {f"heldout/{p}/loss": x for p, x in v["heldout"].items()})
        stages.done(f"held-out loss {v['name']}", False, ", ".join(f"{p} {x:.3f}" for p, x in v["heldout"].items()))

    cells = []
    if has_task:
        if sc.floor:
            variants.append(_floor_variant(sc, c, exp_id, parent, base, variants, base_tags))
        by_name = {v["name"]: v for v in variants}
        common = {"db_path": db, "task_name": task_info["name"], "labels": task_info["labels"],
                  "tokenizer_path": tok["path"], "specials": tok["specials"]}

        def on_done(cell: dict, cached: bool) -> None:
            log_cell(c, exp_id, by_name[cell["variant"]], cell, task_info["name"], base_tags)
            what = (f"failed: {cell['error'][:120]}" if cell.get("error") else
                    f"test accuracy {cell['scores']['test']['accuracy']:.3f}")
            stages.done(f"finetune {cell['variant']} {cell['method']} s{cell['seed']}", cached, what)

        cells = run_cells(variants, methods, cfg.downstream.seeds, common, cfg.study, on_done)
        for v in variants:
            log_variant_summary(c, v, cells, list(methods), task_info["name"])
    report = _report(sc, cfg, ws, c, exp_id, parent, variants, cells, list(methods), corpora, task_info)
    stages.done("report", False, report["markdown_path"], computes=False)
    for v in variants:
        c.set_terminated(v["run_id"], "FINISHED")
    failed = [x for x in cells if x.get("error")]
    if failed:
        raise RuntimeError(f"{len(failed)} fine-tuning cell(s) failed, the report lists them "
                           f"({report['markdown_path']}); first: {failed[0]['error']}")
    return {"experiment": cfg.experiment, "experiment_id": exp_id, "parent_run_id": parent,
            "flow_run_id": str(flow_run.get_id() or ""), "runs": {v["name"]: v["run_id"] for v in variants},
            "report": report["markdown_path"], "html": report["html_path"], "markdown": report["markdown"],
            "table": [_row(v, cells, list(methods)) for v in variants], "corpora": corpora,
            "variants": {v["name"]: {k: v.get(k) for k in ("plan", "phase_dirs", "summary", "heldout")} for v in variants}}


def _digest(checkpoint: str) -> str:
    from model.checkpoint import MARKER, sha256_file

    return sha256_file(Path(checkpoint) / MARKER)


def _train_variant(sc, ws, c, exp_id, parent, name, plan, base, corpora, tok, base_tags, stages) -> dict:
    """The variant's phases in order, each from the previous one's checkpoint; shared prefixes come from cache."""
    from tasks.tracking import log_dict, log_metric_rows, log_metrics, log_params, read_metric_rows, start_run
    from tasks.training import pretrain

    run_id = start_run(c, exp_id, name, parent=parent, tags=base_tags)
    log_params(c, run_id, {"objective": sc.objective, "model_size": sc.size, "strategy": name,
                           "phases": " -> ".join(f"{p} ({n})" for p, n in plan), "seed": base.seed,
                           "total_steps": sum(n for _, n in plan), "lr": base.lr, "init_optimizer": sc.init_optimizer})
    init_from, rows, dirs, result = "", [], [], None
    for i, (phase, steps) in enumerate(plan):
        tc = copy.deepcopy(base)
        tc.max_steps, tc.data_dir, tc.init_from = steps, corpora[phase]["examples"], init_from
        tc.out_dir = str(ws.stage_dir("runs", f"strategy-{sc.objective}-{config_hash(run_identity(tc))}"))
        train_config = to_dict(tc)
        log_dict(c, run_id, train_config, f"config/phase{i + 1}-{phase}.json")
        result, cached = run_stage(pretrain, train_config=train_config, tokenizer_path=tok["path"], mlflow_run_id=run_id)
        if cached:  # trained for another variant (a shared phase) or an earlier run: copy its curve here
            log_metric_rows(c, run_id, read_metric_rows(Path(result["metrics_file"])))
        rows += read_metric_rows(Path(result["metrics_file"]))
        s = result["summary"]
        dirs.append(result["out_dir"])
        stages.done(f"pretrain {name} {phase}", cached, f"steps {s['init_step']} -> {s['steps']}, "
                                                       f"val/loss on {phase} {s['val/loss']:.3f}")
        step_ckpt = Path(result["out_dir"]) / "checkpoints" / f"step-{s['steps']:07d}"
        # `fresh` starts the next phase from the weights; `restore` from the checkpoint with the AdamW moments.
        init_from = str(step_ckpt if sc.init_optimizer == "restore" and step_ckpt.is_dir() else result["checkpoint"])
    s = result["summary"]
    log_metrics(c, run_id, {k: v for k, v in s.items() if isinstance(v, (int, float))}, step=s["steps"])
    combined = ws.stage_dir("strategies", run_id) / "metrics.jsonl"  # the phases as one curve, for the loss plot
    combined.parent.mkdir(parents=True, exist_ok=True)
    combined.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c.log_artifacts(run_id, result["hf_dir"], "hf_model")
    return {"name": name, "objective": sc.objective, "size": sc.size, "arch": get_objective(sc.objective).ARCH,
            "run_id": run_id, "summary": s, "metrics_file": str(combined), "checkpoint": result["checkpoint"],
            "hf_dir": result["hf_dir"], "plan": plan, "phase_dirs": dirs, "model_config": to_dict(base)["model"]}


def _floor_variant(sc, c, exp_id, parent, base, variants, base_tags) -> dict:
    from tasks.tracking import log_params, start_run

    run_id = start_run(c, exp_id, "random-init", parent=parent, tags=base_tags)
    log_params(c, run_id, {"objective": "none", "model_size": sc.size, "strategy": "random-init", "seed": base.seed})
    n_params = next((v["summary"]["n_params"] for v in variants if v.get("summary")), 0)
    return {"name": "random-init", "objective": None, "size": sc.size, "arch": get_objective(sc.objective).ARCH,
            "run_id": run_id, "summary": {}, "n_params": n_params, "model_config": to_dict(base)["model"],
            "plan": [], "heldout": {}}


@task(name="task-texts", cache_key_fn=stage_cache_key("warehouse", "flows"), **CACHED)
def task_text_shards(db_path: str, task_name: str, tokenizer_path: str, out_dir: str, task_key: str) -> dict:
    """Token shards of the downstream task's unlabelled texts: train from its train split, validation
    from its validation split (the test split is never read: it scores the fine-tuned models)."""
    from tokenizers import Tokenizer

    from flows.continual import _write_json
    from warehouse.shards import META, file_sha256, token_dtype, write_split
    from warehouse.store import task_split

    tok = Tokenizer.from_file(tokenizer_path)
    dtype = token_dtype(tok.get_vocab_size())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)
    counts = {}
    for split, source in (("train", "train"), ("validation", "validation"), ("test", "validation")):
        texts, pairs, _ = task_split(db_path, task_name, source)
        texts = texts if pairs is None else [f"{a}\n{b}" for a, b in zip(texts, pairs)]
        counts[split] = write_split(tok, iter([texts]), out, split, dtype)
    _write_json(out / META, {"task": task_name, "dtype": dtype.str, "tokenizer_sha256": file_sha256(tokenizer_path),
                             "vocab_size": tok.get_vocab_size(), "splits": counts})
    return {"splits": counts, "dir": out_dir, "outputs": [str(out / META)]}


def _row(v: dict, cells: list[dict], methods: list[str]) -> dict:
    row = {"variant": v["name"], "phases": " -> ".join(f"{p} ({n})" for p, n in v.get("plan", [])) or "-",
           "heldout": v.get("heldout", {}), "steps": (v.get("summary") or {}).get("steps", 0)}
    for method in methods:
        d = reporting.cell_summary(cells, v["name"], method)
        row[method] = {"accuracy": d["accuracy"], "macro_f1": d["macro_f1"]}
    return row


def plot_heldout(variants: list[dict], phases: list[str], path: Path) -> Path:
    """Held-out loss of each variant's final model on each corpus: what adaptation gains and forgets."""
    plt = reporting._pyplot()
    import numpy as np

    shown = [v for v in variants if v.get("heldout")]
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(shown) + 2), 4))
    width = 0.8 / max(1, len(phases))
    x = np.arange(len(shown))
    for j, phase in enumerate(phases):
        ax.bar(x + (j - (len(phases) - 1) / 2) * width, [v["heldout"].get(phase, math.nan) for v in shown], width,
               label=f"{phase} data", color=reporting.COLORS[j % 10])
    ax.set_xticks(x, [v["name"] for v in shown], rotation=15, ha="right")
    ax.set_ylabel("held-out loss (nats)")
    ax.set_title("held-out loss of each strategy's model on each corpus (lower is better)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return reporting._save(fig, path)


def report_markdown(sc, cfg, variants, cells, methods, corpora, task_info, context) -> tuple[str, list[dict]]:
    exp_id = context["experiment_id"]
    phases = list(corpora)
    lines = ["# Pretraining strategies: static, domain-adaptive, task-adaptive", ""]
    for phase, x in corpora.items():
        snap = f", snapshot `{x['snapshot_id']}`" if x["snapshot_id"] else ""
        lines.append(f"- **{phase}**: {x['what']}{snap}: {x['documents']:,} documents, "
                     f"{x['train_tokens']:,} training tokens")
    lines += ["", f"Objective `{sc.objective}`, model `{sc.size}`, one tokenizer for all ({cfg.tokenizer.kind}); each "
                  f"phase continues the previous one's weights ({sc.init_optimizer} optimizer state) under a new warmup. "
                  + ("Equal compute: every variant trains the same number of steps (the last phase is lengthened)."
                     if sc.equal_compute else "Steps per phase as configured (not equal compute)."),
              "", "## Pretraining", "",
              "Held-out loss of each final model on every corpus's validation data: domain and task adaptation "
              "should lower the domain / task loss; the rise on the general data is what the adaptation forgets.", "",
              "| variant | phases (steps) | tokens seen | FLOPs | " + " | ".join(f"loss on {p}" for p in phases)
              + " | MLflow run |", "|---|---|---:|---:|" + "---:|" * len(phases) + "---|"]
    for v in variants:
        if not v.get("plan"):
            continue
        s = v["summary"]
        lines.append(f"| {v['name']} | {' -> '.join(f'{p} ({n})' for p, n in v['plan'])} | {s['tokens_seen']:,} | "
                     f"{s['pretrain_flops']:.2e} | " + " | ".join(f"{v['heldout'][p]:.3f}" for p in phases)
                     + f" | {reporting.run_link(exp_id, v['run_id'])} |")
    rows: list[dict] = []
    if task_info:
        seeds = sorted({c["seed"] for c in cells})
        lines += ["", "## Downstream", "",
                  f"Task `{task_info['name']}`: {len(task_info['labels'])} classes; "
                  f"{task_info['counts'].get('train', 0)} / {task_info['counts'].get('validation', 0)} / "
                  f"{task_info['counts'].get('test', 0)} train / validation / test examples. "
                  + (f"Mean ± 95% t-interval over {len(seeds)} fine-tuning seeds ({', '.join(map(str, seeds))})."
                     if len(seeds) > 1 else "One fine-tuning seed: no interval."), ""]
        lines += reporting.downstream_table(variants, cells, methods) + [""]
        for method in methods:
            block, found = reporting.comparisons(variants, cells, method, cfg.study.alpha)
            lines += block + [""]
            rows += found
    lines += [f"Prefect flow run `{context['flow_run_name']}` ({context['flow_run_id']}); MLflow experiment "
              f"`{cfg.experiment}` ({exp_id}), parent run {reporting.run_link(exp_id, context['parent_run_id'])}."]
    return "\n".join(lines) + "\n", rows


def _report(sc, cfg, ws, c, exp_id, parent, variants, cells, methods, corpora, task_info) -> dict:
    import csv

    context = {"experiment_id": exp_id, "parent_run_id": parent, "flow_run_id": str(flow_run.get_id() or ""),
               "flow_run_name": flow_run.get_name() or ""}
    markdown, pairs = report_markdown(sc, cfg, variants, cells, methods, corpora, task_info, context)
    out = ws.stage_dir("reports", parent)
    out.mkdir(parents=True, exist_ok=True)
    images = [reporting.plot_losses([v for v in variants if v.get("plan")], out / "loss_curves.png"),
              plot_heldout(variants, list(corpora), out / "heldout_loss.png")]
    if task_info:
        images += [reporting.plot_downstream(variants, cells, methods, task_info["name"], out / "downstream.png"),
                   reporting.plot_finetune_curves(variants, cells, methods, out / "finetune_curves.png")]
        with open(out / "pairwise_tests.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["method", "a", "b", "diff_accuracy", "p_value", "p_holm", "n_seeds",
                                                   "significant", "intervals_overlap"])
            writer.writeheader()
            writer.writerows(pairs)
    md_path = out / "report.md"
    md_path.write_text(markdown + "".join(f"\n![{p.stem}]({p.name})\n" for p in images))
    html = reporting.write_html(markdown, images, out / "report.html", "pretraining strategies")
    c.log_artifacts(parent, str(out))
    urls = {p: f"{reporting.MLFLOW_UI}/get-artifact?path={p.name}&run_uuid={parent}" for p in images}
    create_markdown_artifact(markdown=markdown + "".join(f"\n![{p.stem}]({u})\n" for p, u in urls.items()),
                             key="strategies-report", description="pretraining strategies: comparison report")
    for p, url in urls.items():
        create_image_artifact(image_url=url, key=f"strategies-{p.stem.replace('_', '-')}",
                              description=f"pretraining strategies: {p.stem}")
    return {"markdown": markdown, "markdown_path": str(md_path), "html_path": str(html)}
