"""The pretraining pipeline flow: ingest -> split -> tokenizer -> examples -> pretrain -> evaluate -> report.

Every stage is a Prefect task cached on its inputs and code version; MLflow gets one parent run
per flow run, one child run per variant (each objective at each model size, and the random-init
floors) and, under each variant, one run per fine-tuning cell (method x seed). The comparison study
(`pretrain compare`) is this flow over a study config: objectives x sizes x methods x seeds.
"""
from __future__ import annotations

import contextlib
import csv
import shutil
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_image_artifact, create_markdown_artifact
from prefect.runtime import flow_run
from rich.console import Console

from flows.config import PipelineConfig, config_hash, load_config
from flows.matrix import log_cell, log_variant_summary, run_cells
from model.config import ConfigError, TrainConfig, load_dataclass, run_identity, to_dict
from model.objectives import EXAMPLE_KEYS, get_objective, preset
from tasks import report as reporting
from tasks.caching import run_stage
from tasks.data import (check_contamination, define_downstream_task, ingest_corpus, load_downstream_file,
                        make_examples, snapshot_corpus, source_fingerprint, task_file_fingerprint,
                        tokenize_snapshot, tokenizer_for)
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
    n_variants = len(cfg.objectives) * len(cfg.sizes())
    has_task = cfg.downstream.task != "none"
    per_model = sum(len(ft.lr_grid) or 1 for ft in cfg.downstream.method_configs().values())
    n_cells = (n_variants + len(cfg.sizes())) * per_model * len(cfg.downstream.seeds)
    stages = Stages(4 + 3 * n_variants + (3 + n_cells if has_task else 0))

    _report_orphaned_flow_runs(logger)
    with parent_run(ws, cfg.experiment, "pipeline", config_path, logger) as (c, exp_id, parent):
        return _run(cfg, ws, db, c, exp_id, parent, stages, has_task, logger)


@contextlib.contextmanager
def parent_run(ws: Workspace, experiment: str, kind: str, config_path: str, logger):
    """The flow run's MLflow parent run `<kind>-<flow run name>`, as (client, experiment id, run id):
    FINISHED when the block completes, else FAILED together with the child runs it leaves RUNNING.
    Runs an earlier process left RUNNING when it died are marked KILLED first."""
    c = client(ws)
    exp_id = experiment_id(c, ws, experiment)
    for run_id in reap_stale_runs(c, exp_id):
        logger.warning("MLflow run %s was left RUNNING by a process that died; marked KILLED", run_id)
    name = flow_run.get_name() or ""
    parent = start_run(c, exp_id, f"{kind}-{name or 'local'}", tags={
        "prefect.flow_run_id": str(flow_run.get_id() or ""), "prefect.flow_run_name": name, "git_commit": git_commit(),
        "config_path": str(config_path)})
    try:
        yield c, exp_id, parent
    except BaseException:  # failed or stopped: its children still RUNNING failed with it
        for run in c.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'"):
            c.set_terminated(run.info.run_id, "FAILED")
        c.set_terminated(parent, "FAILED")
        raise
    c.set_terminated(parent, "FINISHED")


def _report_orphaned_flow_runs(logger) -> None:
    """Flow runs of this pipeline that Prefect still shows as running (their process may have died)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as prefect:
        runs = prefect.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["pretrain-pipeline", "pretrain-study"])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
    current = str(flow_run.get_id() or "")
    for run in runs:
        if str(run.id) != current:
            logger.warning("Prefect flow run %s (%s) is still marked running since %s; if its process died, "
                           "cancel it in the Prefect UI", run.name, run.id, run.start_time)


class StudyIncomplete(RuntimeError):
    """Some variants or cells failed; the rest finished and the report lists the failures."""


def _run(cfg, ws, db, c, exp_id, parent, stages, has_task, logger) -> dict:
    data = _prepare(cfg, db, ws, stages, has_task)
    snapshot_id, tok, shards = data["snapshot_id"], data["tokenizer"], data["shards"]
    log_params(c, parent, {"snapshot_id": snapshot_id, "n_documents": data["n_documents"],
                           "objectives": ",".join(cfg.objectives), "model_size": ",".join(cfg.sizes()),
                           "tokenizer": f"{cfg.tokenizer.kind}-{tok['vocab_size']}",
                           "train_tokens": shards["splits"]["train"]["tokens"]})
    c.set_tag(parent, "snapshot_id", snapshot_id)
    c.log_artifact(parent, tok["path"])
    log_dict(c, parent, asdict(cfg), "pipeline_config.json")
    base_tags = {"snapshot_id": snapshot_id, "git_commit": git_commit()}

    variants = []
    for size in cfg.sizes():
        for objective in cfg.objectives:
            name = objective if len(cfg.sizes()) == 1 else f"{objective}@{size}"
            variants.append(_pretrain_variant(cfg, ws, c, exp_id, parent, data, objective, size, name, base_tags,
                                              stages, logger))

    task, cells, methods = data["task"], [], cfg.downstream.method_configs()
    if has_task:
        for size in cfg.sizes():
            variants.append(_floor_variant(cfg, c, exp_id, parent, variants, size, tok["vocab_size"], base_tags))
        common = {"db_path": db, "task_name": task["name"], "labels": task["labels"], "tokenizer_path": tok["path"],
                  "specials": tok["specials"]}
        by_name = {v["name"]: v for v in variants}

        def on_done(cell: dict, cached: bool) -> None:
            log_cell(c, exp_id, by_name[cell["variant"]], cell, task["name"], base_tags)
            what = (f"failed: {cell['error'][:120]}" if cell.get("error") else
                    f"test accuracy {cell['scores']['test']['accuracy']:.3f}, macro-F1 {cell['scores']['test']['macro_f1']:.3f}")
            lr = f" lr{cell['lr']:g}" if cell.get("grid") else ""
            stages.done(f"finetune {cell['variant']} {cell['method']}{lr} s{cell['seed']}", cached, what)

        cells = run_cells(variants, methods, cfg.downstream.seeds, common, cfg.study, on_done)
        for v in variants:
            if not v.get("error"):
                log_variant_summary(c, v, cells, list(methods), task["name"])

    context = {"snapshot_id": snapshot_id, "n_documents": data["n_documents"],
               "train_tokens": shards["splits"]["train"]["tokens"],
               "tokenizer": f"{cfg.tokenizer.kind} ({tok['vocab_size']:,})", "sizes": cfg.sizes(),
               "task": task, "experiment": cfg.experiment, "experiment_id": exp_id, "parent_run_id": parent,
               "flow_run_id": str(flow_run.get_id() or ""), "flow_run_name": flow_run.get_name() or "",
               "contamination": data["contamination"], "contamination_threshold": cfg.downstream.contamination_threshold,
               "alpha": cfg.study.alpha}
    report = _write_report(c, ws, parent, variants, cells, list(methods), context, cfg.experiment)
    stages.done("report", False, str(report["dir"]), computes=False)
    for v in variants:
        if not v.get("error"):
            c.set_terminated(v["run_id"], "FINISHED")
    logger.info("report written to %s", report["markdown_path"])
    failures = [f"{v['name']}: {v['error']}" for v in variants if v.get("error")]
    failures += [f"{x['variant']}/{x['method']}/s{x['seed']}: {x['error']}" for x in cells
                 if x.get("error") and not x["error"].startswith("pretraining failed")]
    if failures:
        raise StudyIncomplete(f"{len(failures)} part(s) of the study failed, the report lists them "
                              f"({report['markdown_path']}); first: {failures[0]}")
    return {
        "experiment": cfg.experiment, "experiment_id": exp_id, "parent_run_id": parent,
        "flow_run_id": context["flow_run_id"], "flow_run_name": context["flow_run_name"],
        "runs": {v["name"]: v["run_id"] for v in variants}, "snapshot_id": snapshot_id,
        "report": report["markdown_path"], "html": report["html_path"], "markdown": report["markdown"],
        "cached_stages": stages.cached, "ran_stages": stages.ran,
        "table": [_table_row(v, cells, list(methods)) for v in variants],
    }


def snapshot_stages(cfg, db: str, stages: Stages, has_task: bool) -> tuple[dict, dict | None]:
    """ingest -> downstream task -> snapshot + split: the data version a run trains on, and its task.

    Shared with the continual flow, which snapshots its watched sources the same way.
    """
    sources = [asdict(s) for s in cfg.corpus.source_specs()]
    d = cfg.downstream
    ingest_sources = list(sources)
    builtin_task = has_task and not d.path
    if builtin_task and d.source not in {s["name"] for s in sources}:
        # The built-in task's documents are read too, for evaluation only: the snapshot below is
        # made of the corpus sources alone.
        ingest_sources.append(asdict(SourceSpec(name=d.source, builtin="python-docs")))
    fingerprint = source_fingerprint(ingest_sources)
    ingest, cached = run_stage(ingest_corpus, db_path=db, sources=ingest_sources, min_chars=cfg.corpus.min_chars,
                               quality=asdict(cfg.corpus.quality), fingerprint=fingerprint)
    stages.done("ingest", cached, f"{ingest['n_documents']:,} documents, {ingest['n_rejects']} rejects")
    upstream = config_hash(fingerprint)

    task = None
    if builtin_task:
        task, cached = run_stage(define_downstream_task, db_path=db, task_name=d.task, source=d.source,
                                 n_classes=d.n_classes, min_chars=d.min_chars, val_frac=d.val_frac,
                                 test_frac=d.test_frac, ingest_key=upstream)
    elif has_task:
        spec = d.file_spec()
        task, cached = run_stage(load_downstream_file, db_path=db, task_name=d.task, spec=spec, val_frac=d.val_frac,
                                 test_frac=d.test_frac, fingerprint=task_file_fingerprint(spec), ingest_key=upstream)
    if task:
        kind = "text pairs" if task.get("pair") else "texts"
        stages.done("downstream task", cached, f"{task['name']}: {len(task['labels'])} classes, "
                                                f"{task['counts']['total']} {kind}")

    snap, cached = run_stage(snapshot_corpus, db_path=db, name=cfg.corpus.name,
                             sources=[s["name"] for s in sources], val_frac=cfg.corpus.val_frac,
                             test_frac=cfg.corpus.test_frac, near_dup=asdict(cfg.corpus.near_dup),
                             upstream_key=config_hash([upstream, task]))
    stages.done("snapshot + split", cached, f"{snap['snapshot_id']}: {snap['splits']}")
    return snap, task


def _prepare(cfg, db: str, ws, stages: Stages, has_task: bool) -> dict:
    """ingest -> downstream task -> snapshot + split -> contamination -> tokenizer -> token shards."""
    snap, task = snapshot_stages(cfg, db, stages, has_task)
    snapshot_id = snap["snapshot_id"]
    d = cfg.downstream

    contamination = {}
    if task:
        contamination, cached = run_stage(check_contamination, db_path=db, snapshot_id=snapshot_id, task_name=task["name"],
                                          n=d.contamination_n, task_key=config_hash(task))
        worst = max((x["contaminated_frac"] for x in contamination.values()), default=0.0)
        stages.done("contamination", cached, f"{worst:.1%} of the worst evaluation split overlaps the snapshot")
        if worst > d.contamination_threshold:
            get_run_logger().warning("%.1f%% of an evaluation split overlaps the pretraining snapshot (%d-grams); "
                                     "see the report's contamination table", 100 * worst, d.contamination_n)

    tok_cfg = asdict(cfg.tokenizer)
    tok_dir = ws.stage_dir("tokenizers", f"{snapshot_id}-{config_hash(tok_cfg)}")
    tok, cached = run_stage(tokenizer_for, db_path=db, snapshot_id=snapshot_id, config=tok_cfg,
                            out_path=str(tok_dir / "tokenizer.json"))
    stages.done("tokenizer", cached, f"{cfg.tokenizer.kind}, vocab {tok['vocab_size']:,}")

    shard_dir = ws.stage_dir("shards", tok_dir.name)
    shards, cached = run_stage(tokenize_snapshot, db_path=db, snapshot_id=snapshot_id,
                               tokenizer_path=tok["path"], out_dir=str(shard_dir))
    stages.done("token shards", cached, ", ".join(f"{s} {v['tokens']:,}" for s, v in shards["splits"].items()))
    return {"snapshot_id": snapshot_id, "n_documents": snap["n_documents"], "task": task, "tokenizer": tok,
            "shards": shards, "shard_dir": shard_dir, "contamination": contamination}


def _pretrain_variant(cfg, ws, c, exp_id, parent, data, objective, size, name, base_tags, stages, logger) -> dict:
    """examples -> pretraining -> intrinsic eval of one objective at one size; a failure is recorded, not raised."""
    obj = get_objective(objective)
    tok, shard_dir = data["tokenizer"], data["shard_dir"]
    variant = {"name": name, "objective": objective, "size": size, "arch": obj.ARCH, "run_id": "", "summary": {}}
    tc = load_dataclass(TrainConfig, preset(objective, cfg.train))
    tc.objective, tc.specials = objective, tok["specials"]
    tc.model = cfg.model_config(obj.ARCH, tok["vocab_size"], size)
    variant["model_config"] = to_dict(tc)["model"]
    run_id = _variant_run(c, exp_id, parent, name, {
        "objective": objective, "model_size": size, "snapshot_id": data["snapshot_id"], "seed": tc.seed,
        "arch": obj.ARCH, "seq_len": tc.seq_len, "batch_size": tc.batch_size, "max_steps": tc.max_steps,
        "lr": tc.lr, "vocab_size": tok["vocab_size"]}, base_tags)
    variant["run_id"] = run_id
    try:
        example_config = {k: getattr(tc, k) for k in (*EXAMPLE_KEYS, "specials")}
        ex_dir = ws.stage_dir("examples", f"{objective}-{config_hash(example_config)}-{shard_dir.name}")
        examples, cached = run_stage(make_examples, train_config=example_config, shard_dir=str(shard_dir),
                                     tokenizer_path=tok["path"], out_dir=str(ex_dir))
        stages.done(f"examples {name}", cached, f"rows {examples['rows']}")
        tc.data_dir = str(ex_dir)
        tc.out_dir = str(ws.stage_dir("runs", f"{objective}-{config_hash(run_identity(tc))}"))
        train_config = to_dict(tc)
        log_dict(c, run_id, train_config, "config/train_config.json")
        log_params(c, run_id, {f"examples_{split}": n for split, n in examples["rows"].items()}
                   | {"row_width": examples["row_width"], "max_flops": tc.max_flops})
        c.log_text(run_id, examples["sample"], "examples/sample.txt")
        result, cached = run_stage(pretrain, train_config=train_config, tokenizer_path=tok["path"], mlflow_run_id=run_id)
    except Exception as exc:  # noqa: BLE001 - one variant's failure must not stop the others
        message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ConfigError) else str(exc)
        logger.error("variant %s failed: %s", name, message)
        c.set_tag(run_id, "error", message[:5000])
        if c.get_run(run_id).info.status == "RUNNING":
            c.set_terminated(run_id, "FAILED")
        stages.done(f"pretrain {name}", False, f"[red]failed[/red]: {message[:160]}")
        return {**variant, "error": message}
    if cached:  # the metrics streamed into the run that trained it; copy them into this one
        log_metric_rows(c, run_id, read_metric_rows(Path(result["metrics_file"])))
        c.set_tag(run_id, "trained_in_run", result["mlflow_run_id"] or "")
    s = result["summary"]
    log_metrics(c, run_id, {k: v for k, v in s.items() if isinstance(v, (int, float)) and k != "throughput/tokens_per_s"},
                step=tc.max_steps)
    c.log_artifact(run_id, tok["path"])
    c.log_artifacts(run_id, result["hf_dir"], "hf_model")
    stages.done(f"pretrain {name}", cached,
                f"val/loss {s['val/loss']:.3f}, {s['throughput/tokens_per_s']:,.0f} tokens/s on {s['device']}")
    stages.done(f"intrinsic eval {name}", cached,
                "val " + ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in s.items() if k.startswith("val/")))
    return {**variant, "summary": s, "metrics_file": result["metrics_file"], "checkpoint": result["checkpoint"],
            "hf_dir": result["hf_dir"], "train_config": train_config}


def _floor_variant(cfg, c, exp_id, parent, variants, size, vocab_size, base_tags) -> dict:
    """The random-init floor at one size, with the architecture of the first objective at that size."""
    first = next((v for v in variants if v["size"] == size and "model_config" in v), None)
    model_config = first["model_config"] if first else to_dict(cfg.model_config("encoder", vocab_size, size))
    name = "random-init" if len(cfg.sizes()) == 1 else f"random-init@{size}"
    run_id = _variant_run(c, exp_id, parent, name, {
        "objective": "none", "model_size": size, "snapshot_id": base_tags["snapshot_id"],
        "seed": cfg.downstream.seeds[0], "arch": model_config["arch"]}, base_tags)
    n_params = next((v["summary"]["n_params"] for v in variants if v["size"] == size and v.get("summary")), 0)
    return {"name": name, "objective": None, "size": size, "arch": model_config["arch"], "run_id": run_id,
            "summary": {}, "n_params": n_params, "model_config": model_config}


def _write_report(c, ws, parent, variants, cells, methods, context, title) -> dict:
    markdown, pairs = reporting.build_markdown(variants, cells, methods, context)
    report_dir = ws.stage_dir("reports", parent)
    report_dir.mkdir(parents=True, exist_ok=True)
    md_path = report_dir / "report.md"
    images = _plots(ws, variants, cells, methods, context["task"], report_dir)
    if context["task"]:
        with open(report_dir / "pairwise_tests.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["method", "a", "b", "diff_accuracy", "p_value", "p_holm", "n_seeds",
                                                   "significant", "intervals_overlap"])
            writer.writeheader()
            writer.writerows(pairs)
    html_path = reporting.write_html(markdown, images, report_dir / "report.html", title)
    md_path.write_text(markdown + "".join(f"\n![{p.stem}]({p.name})\n" for p in images))
    c.log_artifacts(parent, str(report_dir))
    # The Prefect UI shows the plots from the MLflow server that `pretrain ui` starts beside it.
    urls = {p: f"{reporting.MLFLOW_UI}/get-artifact?path={p.name}&run_uuid={parent}" for p in images}
    create_markdown_artifact(markdown=markdown + "".join(f"\n![{p.stem}]({u})\n" for p, u in urls.items()),
                             key="pretrain-report", description=f"{title}: comparison report")
    for p, url in urls.items():
        create_image_artifact(image_url=url, key=f"report-{p.stem.replace('_', '-')}", description=f"{title}: {p.stem}")
    return {"dir": report_dir, "markdown": markdown, "markdown_path": str(md_path), "html_path": str(html_path)}


def _plots(ws, variants, cells, methods, task, report_dir: Path) -> list[Path]:
    """The report's PNGs, drawn once per distinct set of results (a cached re-run copies them)."""
    key = config_hash([[{k: v.get(k) for k in ("name", "summary", "metrics_file", "error")} for v in variants],
                       [{k: x for k, x in c.items() if k != "run_id"} for c in cells], methods, task])
    cache = ws.stage_dir("plots", key)
    names = ["loss_curves.png"] + (["downstream.png", "finetune_curves.png"] if task else [])
    if not all((cache / n).exists() for n in names):
        cache.mkdir(parents=True, exist_ok=True)
        reporting.plot_losses(variants, cache / "loss_curves.png")
        if task:
            reporting.plot_downstream(variants, cells, methods, task["name"], cache / "downstream.png")
            reporting.plot_finetune_curves(variants, cells, methods, cache / "finetune_curves.png")
    for n in names:
        shutil.copyfile(cache / n, report_dir / n)
    return [report_dir / n for n in names]


def _table_row(v: dict, cells: list[dict], methods: list[str]) -> dict:
    row = {"variant": v["name"], "val_loss": (v.get("summary") or {}).get("val/loss"), "error": v.get("error")}
    for method in methods:
        d = reporting.cell_summary(cells, v["name"], method)
        row[method] = {"accuracy": d["accuracy"][0], "macro_f1": d["macro_f1"][0]}
    return row
