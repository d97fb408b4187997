"""The pretraining pipeline flow: ingest -> split -> tokenizer -> examples -> pretrain -> evaluate -> report.

Every stage is a Prefect task cached on its inputs and code version; MLflow gets one parent run
per flow run and one child run per variant (each objective, and the random-init floor).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from rich.console import Console

from flows.config import PipelineConfig, config_hash, load_config
from model.checkpoint import MARKER, sha256_file
from model.config import TrainConfig, load_dataclass, to_dict
from model.objectives import EXAMPLE_KEYS, get_objective, preset
from tasks import report as reporting
from tasks.caching import run_stage
from tasks.data import (define_downstream_task, ingest_corpus, make_examples, snapshot_corpus,
                        source_fingerprint, tokenize_snapshot, tokenizer_for)
from tasks.evaluation import finetune_downstream
from tasks.tracking import (client, experiment_id, log_dict, log_metric_rows, log_metrics, log_params,
                            read_metric_rows, reap_stale_runs, start_run)
from tasks.training import pretrain
from tasks.workspace import Workspace, git_commit
from warehouse.sources import SourceSpec

console = Console(stderr=True, soft_wrap=True)


class Stages:
    """Prints one line per stage and remembers which were served from cache."""

    def __init__(self, total: int):
        self.total, self.n, self.cached, self.ran = total, 0, [], []

    def done(self, name: str, cached: bool, detail: str = "", computes: bool = True) -> None:
        self.n += 1
        if computes:  # the report is always rewritten: it is not a cacheable computation
            (self.cached if cached else self.ran).append(name)
        tag = "[dim]cached[/dim]" if cached else "[green]done[/green]"
        console.print(f"[bold]\\[{self.n}/{self.total}][/bold] {name:<22} {tag}  {detail}")


def _variant_run(c, exp_id: str, parent: str, name: str, params: dict, tags: dict) -> str:
    run_id = start_run(c, exp_id, name, parent=parent, tags=tags)
    log_params(c, run_id, params)
    return run_id


@flow(name="pretrain-pipeline", log_prints=True)
def pretrain_pipeline(config_path: str = "demo.yaml", overrides: list[str] | None = None) -> dict:
    """The whole pipeline on one config; returns where its results are (MLflow ids, report path)."""
    cfg: PipelineConfig = load_config(config_path, overrides or [])
    ws = Workspace.from_env()
    logger = get_run_logger()
    db = str(ws.warehouse)
    n_objectives = len(cfg.objectives)
    has_task = cfg.downstream.task != "none"
    stages = Stages(5 + 3 * n_objectives + (1 + len(cfg.downstream.seeds) * (n_objectives + 1) if has_task else 0))

    c = client(ws)
    exp_id = experiment_id(c, ws, cfg.experiment)
    for run_id in reap_stale_runs(c, exp_id):
        logger.warning("MLflow run %s was left RUNNING by a process that died; marked KILLED", run_id)
    _report_orphaned_flow_runs(logger)
    parent = start_run(c, exp_id, f"pipeline-{flow_run.get_name() or 'local'}", tags={
        "prefect.flow_run_id": str(flow_run.get_id() or ""), "prefect.flow_run_name": flow_run.get_name() or "",
        "git_commit": git_commit(), "config_path": str(config_path)})
    status = "FAILED"
    try:
        result = _run(cfg, ws, db, c, exp_id, parent, stages, has_task, logger)
        status = "FINISHED"
        return result
    finally:
        if status != "FINISHED":  # children still RUNNING when the flow failed or was stopped
            for run in c.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'"):
                c.set_terminated(run.info.run_id, "FAILED")
        c.set_terminated(parent, status)


def _report_orphaned_flow_runs(logger) -> None:
    """Flow runs of this pipeline that Prefect still shows as running (their process may have died)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as prefect:
        runs = prefect.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["pretrain-pipeline"])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
    current = str(flow_run.get_id() or "")
    for run in runs:
        if str(run.id) != current:
            logger.warning("Prefect flow run %s (%s) is still marked running since %s; if its process died, "
                           "cancel it in the Prefect UI", run.name, run.id, run.start_time)


def _run(cfg, ws, db, c, exp_id, parent, stages, has_task, logger) -> dict:
    sources = [asdict(s) for s in cfg.corpus.source_specs()]
    ingest_sources = list(sources)
    if has_task and cfg.downstream.source not in {s["name"] for s in sources}:
        # The built-in task's documents are read too, for evaluation only: the snapshot below is
        # made of the corpus sources alone.
        ingest_sources.append(asdict(SourceSpec(name=cfg.downstream.source, builtin="python-docs")))
    fingerprint = source_fingerprint(ingest_sources)
    ingest, cached = run_stage(ingest_corpus, db_path=db, sources=ingest_sources, min_chars=cfg.corpus.min_chars,
                               fingerprint=fingerprint)
    stages.done("ingest", cached, f"{ingest['n_documents']:,} documents, {ingest['n_rejects']} rejects")
    upstream = config_hash(fingerprint)

    task = None
    if has_task:
        d = cfg.downstream
        task, cached = run_stage(define_downstream_task, db_path=db, task_name=d.task, source=d.source,
                                 n_classes=d.n_classes, min_chars=d.min_chars, val_frac=d.val_frac,
                                 test_frac=d.test_frac, ingest_key=upstream)
        stages.done("downstream task", cached, f"{d.task}: {len(task['labels'])} classes, {task['counts']['total']} documents")

    snap, cached = run_stage(snapshot_corpus, db_path=db, name=cfg.corpus.name,
                             sources=[s["name"] for s in sources], val_frac=cfg.corpus.val_frac,
                             test_frac=cfg.corpus.test_frac, upstream_key=upstream)
    stages.done("snapshot + split", cached, f"{snap['snapshot_id']}: {snap['splits']}")
    snapshot_id = snap["snapshot_id"]

    tok_cfg = asdict(cfg.tokenizer)
    tok_dir = ws.stage_dir("tokenizers", f"{snapshot_id}-{config_hash(tok_cfg)}")
    tok, cached = run_stage(tokenizer_for, db_path=db, snapshot_id=snapshot_id, config=tok_cfg,
                            out_path=str(tok_dir / "tokenizer.json"))
    stages.done("tokenizer", cached, f"{cfg.tokenizer.kind}, vocab {tok['vocab_size']:,}")

    shard_dir = ws.stage_dir("shards", tok_dir.name)
    shards, cached = run_stage(tokenize_snapshot, db_path=db, snapshot_id=snapshot_id,
                               tokenizer_path=tok["path"], out_dir=str(shard_dir))
    stages.done("token shards", cached, ", ".join(f"{s} {v['tokens']:,}" for s, v in shards["splits"].items()))

    log_params(c, parent, {"snapshot_id": snapshot_id, "n_documents": snap["n_documents"],
                           "objectives": ",".join(cfg.objectives), "model_size": cfg.model.size,
                           "tokenizer": f"{cfg.tokenizer.kind}-{tok['vocab_size']}",
                           "train_tokens": shards["splits"]["train"]["tokens"]})
    c.set_tag(parent, "snapshot_id", snapshot_id)
    c.log_artifact(parent, tok["path"])
    log_dict(c, parent, asdict(cfg), "pipeline_config.json")

    specials = tok["specials"]
    base_tags = {"snapshot_id": snapshot_id, "git_commit": git_commit()}
    variants = []
    for objective in cfg.objectives:
        obj = get_objective(objective)
        tc = load_dataclass(TrainConfig, preset(objective, cfg.train))
        tc.objective, tc.specials = objective, specials
        example_config = {k: getattr(tc, k) for k in (*EXAMPLE_KEYS, "specials")}
        ex_dir = ws.stage_dir("examples", f"{objective}-{config_hash(example_config)}-{shard_dir.name}")
        examples, cached = run_stage(make_examples, train_config=example_config, shard_dir=str(shard_dir),
                                     tokenizer_path=tok["path"], out_dir=str(ex_dir))
        stages.done(f"examples {objective}", cached, f"rows {examples['rows']}")

        tc.data_dir = str(ex_dir)
        tc.model = cfg.model_config(obj.ARCH, tok["vocab_size"])
        tc.out_dir = str(ws.stage_dir("runs", f"{objective}-{config_hash(to_dict(tc))}"))
        train_config = to_dict(tc)
        run_id = _variant_run(c, exp_id, parent, objective, {
            "objective": objective, "model_size": cfg.model.size, "snapshot_id": snapshot_id, "seed": tc.seed,
            "arch": obj.ARCH, "seq_len": tc.seq_len, "batch_size": tc.batch_size, "max_steps": tc.max_steps,
            "lr": tc.lr, "vocab_size": tok["vocab_size"]}, base_tags)
        log_dict(c, run_id, train_config, "config/train_config.json")
        log_params(c, run_id, {f"examples_{split}": n for split, n in examples["rows"].items()}
                   | {"row_width": examples["row_width"], "max_flops": tc.max_flops})
        c.log_text(run_id, examples["sample"], "examples/sample.txt")
        result, cached = run_stage(pretrain, train_config=train_config, tokenizer_path=tok["path"], mlflow_run_id=run_id)
        if cached:  # the metrics streamed into the run that trained it; copy them into this one
            log_metric_rows(c, run_id, read_metric_rows(Path(result["metrics_file"])))
            c.set_tag(run_id, "trained_in_run", result["mlflow_run_id"] or "")
        s = result["summary"]
        log_metrics(c, run_id, {k: v for k, v in s.items() if isinstance(v, (int, float)) and k != "throughput/tokens_per_s"},
                    step=tc.max_steps)
        c.log_artifact(run_id, tok["path"])
        c.log_artifacts(run_id, result["hf_dir"], "hf_model")
        stages.done(f"pretrain {objective}", cached,
                    f"val/loss {s['val/loss']:.3f}, {s['throughput/tokens_per_s']:,.0f} tokens/s on {s['device']}")
        variants.append({"name": objective, "objective": objective, "arch": obj.ARCH, "run_id": run_id,
                         "summary": s, "metrics_file": result["metrics_file"], "checkpoint": result["checkpoint"],
                         "hf_dir": result["hf_dir"], "train_config": train_config, "downstream": []})
        stages.done(f"intrinsic eval {objective}", cached,
                    "val " + ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in s.items() if k.startswith("val/")))

    if has_task:
        floor_cfg = variants[0]["train_config"]["model"]
        floor_id = _variant_run(c, exp_id, parent, "random-init", {
            "objective": "none", "model_size": cfg.model.size, "snapshot_id": snapshot_id,
            "seed": cfg.downstream.seeds[0], "arch": floor_cfg["arch"]}, base_tags)
        variants.append({"name": "random-init", "objective": None, "arch": floor_cfg["arch"], "run_id": floor_id,
                         "summary": {}, "n_params": variants[0]["summary"]["n_params"], "downstream": []})
        ft_cfg = asdict(cfg.downstream.finetune)
        for v in variants:
            for seed in cfg.downstream.seeds:
                source = ({"checkpoint": v["checkpoint"], "checkpoint_digest": sha256_file(Path(v["checkpoint"]) / MARKER)}
                          if v["objective"] else {"random_model": floor_cfg})
                ft, cached = run_stage(finetune_downstream, db_path=db, task_name=task["name"], labels=task["labels"],
                                       tokenizer_path=tok["path"], specials=specials, finetune_config=ft_cfg,
                                       seed=seed, variant=v["name"], **source)
                v["downstream"].append(ft)
                t = ft["scores"]["test"]
                stages.done(f"finetune {v['name']} s{seed}", cached, f"test accuracy {t['accuracy']:.3f}, macro-F1 {t['macro_f1']:.3f}")
            _log_downstream(c, v, task["name"])
        stages.done("report", False, computes=False)

    context = {"snapshot_id": snapshot_id, "n_documents": snap["n_documents"],
               "train_tokens": shards["splits"]["train"]["tokens"],
               "tokenizer": f"{cfg.tokenizer.kind} ({tok['vocab_size']:,})", "model_size": cfg.model.size,
               "task": task, "experiment": cfg.experiment, "experiment_id": exp_id, "parent_run_id": parent,
               "flow_run_id": str(flow_run.get_id() or ""), "flow_run_name": flow_run.get_name() or ""}
    markdown = reporting.build_markdown(variants, context)
    report_dir = ws.stage_dir("reports", parent)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "report.md").write_text(markdown)
    c.log_artifact(parent, str(report_dir / "report.md"))
    c.log_artifact(parent, str(reporting.plot_losses(variants, report_dir / "loss_curves.png")))
    if task:
        c.log_artifact(parent, str(reporting.plot_downstream(variants, task["name"], report_dir / "downstream.png")))
    create_markdown_artifact(markdown=markdown, key="pretrain-report", description=f"{cfg.experiment}: comparison report")
    for v in variants:
        c.set_terminated(v["run_id"], "FINISHED")
    logger.info("report written to %s", report_dir / "report.md")
    return {
        "experiment": cfg.experiment, "experiment_id": exp_id, "parent_run_id": parent,
        "flow_run_id": context["flow_run_id"], "flow_run_name": context["flow_run_name"],
        "runs": {v["name"]: v["run_id"] for v in variants}, "snapshot_id": snapshot_id,
        "report": str(report_dir / "report.md"), "markdown": markdown,
        "cached_stages": stages.cached, "ran_stages": stages.ran,
        "table": [_table_row(v) for v in variants],
    }


def _log_downstream(c, v: dict, task_name: str) -> None:
    summary = reporting.downstream_summary(v["downstream"])
    values = {f"downstream/{task_name}/{k}": mean for k, (mean, _) in summary.items()}
    values.update({f"downstream/{task_name}/{k}_ci95": half for k, (_, half) in summary.items() if half == half})
    log_metrics(c, v["run_id"], values)
    for ft in v["downstream"]:
        log_metric_rows(c, v["run_id"], [{"step": p["epoch"], f"finetune/seed{ft['seed']}/val_accuracy": p["val_accuracy"],
                                          f"finetune/seed{ft['seed']}/train_loss": p["train_loss"]} for p in ft["curve"]])


def _table_row(v: dict) -> dict:
    row = {"variant": v["name"], "val_loss": v["summary"].get("val/loss")}
    if v["downstream"]:
        d = reporting.downstream_summary(v["downstream"])
        row.update({"accuracy": d["accuracy"][0], "macro_f1": d["macro_f1"][0]})
    return row
