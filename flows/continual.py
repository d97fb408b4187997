"""Continual pretraining, run as a scheduled deployment: `continual-pretraining`.

Each run looks at the watched sources. When nothing changed it ends at once, Completed with "no new
data", having compared file stats with the last run's (no torch, MLflow or DuckDB is imported on
that path). Otherwise it takes the training slot (a Prefect global concurrency limit of 1, so two
runs never train at once), ingests and snapshots the sources, and, for a snapshot no model was
trained on yet:

1. tokenizes with the champion's tokenizer (the first run trains one: model, objective and
   tokenizer must stay the same for the whole series);
2. trains from the champion's checkpoint (`train.init_from`; AdamW moments restored or fresh, the
   learning rate warmed up again) on the documents the champion has not seen, plus `replay` of
   its own training documents; steps, tokens and FLOPs count on from the champion's;
3. measures forgetting: held-out loss of the candidate and of the champion on each processed
   snapshot's new validation documents (the earlier ones: forgetting; this one: gain);
4. fine-tunes both on the downstream task, when there is one (the champion's cells come from cache);
5. registers the candidate as a new version of the MLflow registered model, and moves the alias
   to it only if the gate passes (tasks/registry.py); the decision and its numbers are logged;
6. writes the forgetting plot and a report to MLflow and as Prefect artefacts.

The MLflow registry is the ledger: a snapshot that some version is tagged with has been processed.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import string
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml
from prefect import flow, get_run_logger, task
from prefect.states import Completed

from model.config import SIZES, ConfigError, load_dataclass
from model.objectives import OBJECTIVES
from tasks.caching import stage_cache_key
from tasks.registry import GateConfig
from tasks.workspace import Workspace, code_version
from warehouse.sources import SourceError, SourceSpec, expand

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
LAST_CHECK = "last_check.json"
CACHED = dict(persist_result=True, result_serializer="json")
SPLITS = ("train", "validation", "test")


@dataclass
class ContinualConfig:
    """The `continual:` section; the rest of the file is a pipeline config (corpus, tokenizer, train, downstream)."""

    # The watched sources ($PRETRAIN_HOME in a path is the workspace); new files there make a new snapshot.
    sources: list[SourceSpec] = field(default_factory=lambda: [SourceSpec(name="incoming", path="$PRETRAIN_HOME/incoming")])
    objective: str = "clm"
    size: str = "tiny"
    steps_per_update: int = 200  # training steps of each update (train.max_steps)
    init_optimizer: str = "restore"  # restore: the champion's AdamW moments | fresh
    replay: float = 0.0  # fraction of the champion's training documents mixed into the new ones (0 to 1)
    gate: GateConfig = field(default_factory=GateConfig)
    registered_model: str = "continual-lm"
    alias: str = "champion"

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"continual.objective={self.objective!r} is unknown; use one of {', '.join(OBJECTIVES)}")
        if self.size not in SIZES:
            raise ConfigError(f"continual.size={self.size!r} is unknown; use one of {', '.join(SIZES)}")
        if self.steps_per_update < 1:
            raise ConfigError(f"continual.steps_per_update={self.steps_per_update} must be at least 1")
        if self.init_optimizer not in ("restore", "fresh"):
            raise ConfigError(f"continual.init_optimizer={self.init_optimizer!r} is unknown; use restore or fresh")
        if not 0 <= self.replay <= 1:
            raise ConfigError(f"continual.replay={self.replay:g} must be between 0 and 1")
        if not self.sources:
            raise ConfigError("continual.sources is empty; list the folders to watch, e.g. [{name: incoming, path: data/in}]")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.registered_model):
            raise ConfigError(f"continual.registered_model={self.registered_model!r}: use letters, digits, '-', '_', '.'")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", self.alias) or re.fullmatch(r"[vV]\d+", self.alias):
            raise ConfigError(f"continual.alias={self.alias!r}: use a name such as champion (not v<number>)")


# Keys the continual section decides; setting them elsewhere would be silently overridden.
OWNED = {("objectives",): "continual.objective", ("model", "size"): "continual.size",
         ("train", "max_steps"): "continual.steps_per_update", ("train", "max_flops"): "continual.steps_per_update",
         ("train", "init_optimizer"): "continual.init_optimizer", ("train", "init_from"): "the champion (automatic)",
         ("corpus", "sources"): "continual.sources", ("corpus", "path"): "continual.sources"}


def _apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`--set key=value` as flows.config applies it; repeated here because importing flows.config imports
    torch (through model.finetune), which a run with no new data must not pay for."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not key=value; e.g. --set continual.replay=0.25")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
        node, path = data, key.strip().split(".")
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def read_config(path: str | Path, overrides: list[str], ws: Workspace) -> tuple[ContinualConfig, dict]:
    """The continual section, checked, and the rest of the file as data (checked by `pipeline_config`)."""
    p = Path(path).expanduser()
    if not p.exists() and (CONFIG_DIR / p).exists():
        p = CONFIG_DIR / p
    if not p.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass a YAML file, e.g. --config configs/continual.yaml")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections (continual, corpus, train, ...)")
    data = _apply_overrides(data, overrides)
    section = data.pop("continual", None)
    if not isinstance(section, dict):
        raise ConfigError(f"config file {p} has no `continual:` section; see configs/continual.yaml")
    for keys, owner in OWNED.items():
        node: Any = data
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if node is not None:
            raise ConfigError(f"{'.'.join(keys)} is set by {owner} in a continual config; remove it")
    cc = load_dataclass(ContinualConfig, section, "continual.")
    home = {**os.environ, "PRETRAIN_HOME": str(ws.root)}
    for s in cc.sources:
        s.path = string.Template(s.path).safe_substitute(home) if s.path else s.path
    return cc, data


def pipeline_config(cc: ContinualConfig, data: dict):
    """The whole config as a PipelineConfig for one update: one objective, the watched sources, steps per update."""
    from flows.config import PipelineConfig

    d = copy.deepcopy(data)
    d.setdefault("experiment", f"continual-{cc.registered_model}")
    d["objectives"] = [cc.objective]
    d.setdefault("model", {})["size"] = cc.size
    d.setdefault("train", {})["max_steps"] = cc.steps_per_update
    corpus = d.setdefault("corpus", {})
    corpus["sources"] = [asdict(s) for s in cc.sources]
    corpus.setdefault("name", cc.registered_model)
    return load_dataclass(PipelineConfig, d).validate()


def load_continual_config(path: str | Path, overrides: list[str] | None = None):
    """Both halves checked (what `pretrain continual` and `pretrain serve` validate before starting)."""
    ws = Workspace.from_env()
    cc, data = read_config(path, overrides or [], ws)
    return cc, pipeline_config(cc, data)


def _stat(p: Path) -> list:
    try:
        st = p.stat()
    except OSError:  # a dangling link: the ingest rejects it, the fingerprint notes the link itself
        st = p.lstat()
    return [str(p), st.st_size, st.st_mtime_ns]


def watched_files(s: SourceSpec) -> list[Path]:
    """A watched source's files; a missing folder is one clear line (its files may simply not have come yet)."""
    try:
        return expand(s)
    except SourceError:
        raise SourceError(f"watched source {s.name!r}: {s.path} does not exist; create it and drop text files into "
                          "it, or fix continual.sources") from None


def check_watched(cc: ContinualConfig) -> None:
    for s in cc.sources:
        if not s.builtin:
            watched_files(s)


def watched_folders(cc: ContinualConfig, ws: Workspace) -> list[Path]:
    """The watched folders inside the workspace (`pretrain serve` creates them so that files can be dropped in)."""
    out = []
    for s in cc.sources:
        p = Path(s.path).expanduser().resolve() if s.path else None
        if p and not any(ch in s.path for ch in "*?[") and p.is_relative_to(ws.root) and not p.is_file():
            out.append(p)
    return out


def create_watched_folders(cc: ContinualConfig, ws: Workspace) -> list[Path]:
    """A watched folder inside the workspace is created empty (a deployment's first run, before anything was
    dropped, is then "no new data"); one elsewhere must exist, since a missing one is more likely a typo."""
    folders = watched_folders(cc, ws)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    return folders


def watch_fingerprint(cc: ContinualConfig, data: dict) -> tuple[str, int]:
    """(hash of everything a snapshot depends on, number of watched files).

    File paths, sizes and mtimes (as the ingest's cache key), the whole config, the interpreter (the
    built-in corpus) and the warehouse code: equal fingerprints mean the same snapshot.
    """
    files, n_files = [], 0
    for s in cc.sources:
        if s.builtin:
            files.append([s.builtin])
            n_files += 1
            continue
        stats = [_stat(p) for p in watched_files(s)]
        files.append(stats)
        n_files += len(stats)
    task_path = (data.get("downstream") or {}).get("path")
    if task_path and Path(task_path).expanduser().exists():
        root = Path(task_path).expanduser()
        files.append([_stat(p) for p in (sorted(x for x in root.rglob("*") if x.is_file()) if root.is_dir() else [root])])
    payload = json.dumps([files, asdict(cc), data, sys.version, code_version("warehouse")], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest(), n_files


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def slot_name(cc: ContinualConfig) -> str:
    return f"continual-train-{cc.registered_model}"


def ensure_slot(name: str, limit: int = 1) -> None:
    """The global concurrency limit the training takes; created when missing (an unknown limit would
    not limit anything: Prefect only warns and goes on)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
            except ObjectAlreadyExists:  # another run created it meanwhile
                pass


@flow(name="continual-pretraining", log_prints=True)
def continual_pretraining(config_path: str = "continual.yaml", overrides: list[str] | None = None):
    """One check of the watched sources; trains, gates and registers a new model when there is new data."""
    from prefect.concurrency.sync import concurrency

    ws = Workspace.from_env()
    logger = get_run_logger()
    cc, data = read_config(config_path, overrides or [], ws)
    state_dir = ws.stage_dir("continual", cc.registered_model)
    create_watched_folders(cc, ws)
    fingerprint, n_files = watch_fingerprint(cc, data)
    if n_files == 0:
        where = ", ".join(s.path for s in cc.sources)
        return _finish(logger, {"status": "no-new-data", "trained": False,
                                "message": f"no new data: the watched sources hold no files yet ({where})"})
    last = _read_json(state_dir / LAST_CHECK)
    if last.get("fingerprint") == fingerprint:
        return _finish(logger, {"status": "no-new-data", "trained": False, "snapshot_id": last.get("snapshot_id"),
                                "message": f"no new data: the watched sources are unchanged since the last check "
                                           f"(snapshot {last.get('snapshot_id')})"})
    name = slot_name(cc)
    ensure_slot(name)
    asked = time.perf_counter()
    with concurrency(name, occupy=1, strict=True):
        waited = time.perf_counter() - asked
        if waited > 1:
            logger.info("waited %.0f s for the training slot %r, held by another run", waited, name)
        result = {**_update(cc, data, ws, logger), "slot_wait_s": waited}
    # Written only when the run got this far: a failed run leaves the last check as it was, so the next run retries.
    _write_json(state_dir / LAST_CHECK, {"fingerprint": fingerprint, "snapshot_id": result.get("snapshot_id"),
                                         "status": result["status"], "checked_at": time.time()})
    return _finish(logger, result)


def _finish(logger, result: dict):
    logger.info(result["message"])
    return Completed(message=result["message"], data=result)


def _update(cc: ContinualConfig, data: dict, ws: Workspace, logger) -> dict:
    """Snapshot, and for an unprocessed snapshot: train, measure, gate, register (inside the training slot)."""
    from flows.pipeline import Stages, snapshot_stages
    from tasks import registry
    from tasks.tracking import client

    cfg = pipeline_config(cc, data)
    has_task = cfg.downstream.task != "none"
    n_cells = sum(len(ft.lr_grid) or 1 for ft in cfg.downstream.method_configs().values()) * len(cfg.downstream.seeds)
    stages = Stages(9 + (1 + 2 * n_cells if has_task else 0))  # exact once there is a champion
    db = str(ws.warehouse)
    snap, task_info = snapshot_stages(cfg, db, stages, has_task)
    snapshot_id = snap["snapshot_id"]
    c = client(ws)
    done = [v for v in registry.versions(c, cc.registered_model) if v.tags.get("snapshot_id")]
    if snapshot_id in {v.tags["snapshot_id"] for v in done}:
        return {"status": "no-new-data", "trained": False, "snapshot_id": snapshot_id,
                "message": f"no new data: snapshot {snapshot_id} was trained on already"}
    if done and _created(db, snapshot_id) < _created(db, done[-1].tags["snapshot_id"]):
        # A run that reaches the slot late must not train an older data version over a newer one.
        return {"status": "superseded", "trained": False, "snapshot_id": snapshot_id,
                "message": f"skipped: snapshot {snapshot_id} is older than snapshot {done[-1].tags['snapshot_id']}, "
                           f"which version {done[-1].version} was trained on"}
    return _train_update(cc, cfg, ws, c, db, snap, task_info, done, stages, logger)


def _created(db: str, snapshot_id: str):
    from warehouse.store import connect

    with connect(db, read_only=True) as con:
        return con.execute("SELECT created_at FROM snapshots WHERE snapshot_id = ?", [snapshot_id]).fetchone()[0]


def _train_update(cc, cfg, ws, c, db, snap, task_info, done, stages, logger) -> dict:
    from flows.config import config_hash
    from model.checkpoint import load_train_config
    from model.config import TrainConfig, run_identity, to_dict
    from model.objectives import EXAMPLE_KEYS, get_objective, preset
    from prefect.runtime import flow_run
    from tasks import registry
    from tasks.caching import run_stage
    from tasks.data import make_examples, tokenizer_for
    from tasks.tracking import (experiment_id, log_dict, log_metric_rows, log_metrics, log_params, read_metric_rows,
                                start_run)
    from tasks.training import pretrain
    from tasks.workspace import git_commit

    snapshot_id = snap["snapshot_id"]
    name, alias = cc.registered_model, cc.alias
    champ = registry.champion(c, name, alias)
    base_snapshot = champ.tags["snapshot_id"] if champ else None
    # The tokenizer (and with it the model's vocabulary and specials) is the first model's for the whole series.
    if champ:
        tok_path = champ.tags["tokenizer"]
        if not Path(tok_path).exists():
            raise ConfigError(f"the champion's tokenizer {tok_path} is gone (version {champ.version}); restore the "
                              f"workspace or start a new series with another continual.registered_model")
        saved = load_train_config(champ.tags["checkpoint"])
        tok = {"path": tok_path, "vocab_size": saved.model.vocab_size, "specials": saved.specials}
        stages.done("tokenizer", True, f"the champion's (version {champ.version}), vocab {tok['vocab_size']:,}")
    else:
        tok_cfg = asdict(cfg.tokenizer)
        tok_dir = ws.stage_dir("tokenizers", f"{snapshot_id}-{config_hash(tok_cfg)}")
        tok, cached = run_stage(tokenizer_for, db_path=db, snapshot_id=snapshot_id, config=tok_cfg,
                                out_path=str(tok_dir / "tokenizer.json"))
        stages.done("tokenizer", cached, f"trained on the first snapshot: {cfg.tokenizer.kind}, vocab {tok['vocab_size']:,}")

    obj = get_objective(cc.objective)
    tc = load_dataclass(TrainConfig, preset(cc.objective, cfg.train))
    tc.objective, tc.specials = cc.objective, tok["specials"]
    tc.model = cfg.model_config(obj.ARCH, tok["vocab_size"], cc.size)
    if champ and to_dict(saved.model) != to_dict(tc.model):
        raise ConfigError(f"the model config differs from the champion's (version {champ.version}): continual "
                          "pretraining keeps one model; revert continual.size / model.overrides or use another "
                          "continual.registered_model")
    tc.init_optimizer = cc.init_optimizer
    tc.init_from = champ.tags["checkpoint"] if champ else ""

    home = ws.stage_dir("continual", name)
    example_config = {k: getattr(tc, k) for k in (*EXAMPLE_KEYS, "specials")}
    tok_key = config_hash([tok["path"], example_config])[:8]
    data_dir = home / "data" / f"{snapshot_id}-{(base_snapshot or 'scratch')[:8]}-r{cc.replay:g}-{tok_key}"
    shards, cached = run_stage(update_shards, db_path=db, snapshot_id=snapshot_id, base_snapshot_id=base_snapshot,
                               replay=cc.replay, tokenizer_path=tok["path"], out_dir=str(data_dir / "shards"))
    stages.done("update data", cached, f"{shards['new_documents']} new training documents, "
                                       f"{shards['replay_documents']} replayed")
    examples, cached = run_stage(make_examples, train_config=example_config, shard_dir=str(data_dir / "shards"),
                                 tokenizer_path=tok["path"], out_dir=str(data_dir / "examples"))
    stages.done("examples", cached, f"rows {examples['rows']}")
    if shards["new_documents"] == 0 or examples["rows"]["train"] < tc.batch_size:
        return {"status": "waiting", "trained": False, "snapshot_id": snapshot_id,
                "message": f"too little new data in snapshot {snapshot_id}: {shards['new_documents']} new training "
                           f"documents make {examples['rows']['train']} rows, fewer than a batch of "
                           f"{tc.batch_size}; waiting for more"}

    exp_id = experiment_id(c, ws, cfg.experiment)
    update_no = len(done) + 1
    tc.data_dir = str(data_dir / "examples")
    tc.out_dir = str(home / "runs" / f"{update_no:03d}-{snapshot_id}-{config_hash(run_identity(tc))}")
    train_config = to_dict(tc)
    tags = {"snapshot_id": snapshot_id, "registered_model": name, "git_commit": git_commit(),
            "prefect.flow_run_id": str(flow_run.get_id() or ""), "prefect.flow_run_name": flow_run.get_name() or ""}
    run_id = start_run(c, exp_id, f"update-{update_no}-{snapshot_id[:8]}", tags=tags)
    status = "FAILED"
    try:
        log_params(c, run_id, {
            "update": update_no, "snapshot_id": snapshot_id, "base_snapshot_id": base_snapshot or "",
            "champion_version": str(champ.version) if champ else "", "init_from": tc.init_from,
            "init_optimizer": tc.init_optimizer, "objective": cc.objective, "model_size": cc.size,
            "steps_per_update": cc.steps_per_update, "replay": cc.replay, "lr": tc.lr,
            "new_documents": shards["new_documents"], "replay_documents": shards["replay_documents"],
            "gate.max_old_loss_increase": cc.gate.max_old_loss_increase, "gate.max_score_drop": cc.gate.max_score_drop,
            **{f"examples_{k}": v for k, v in examples["rows"].items()}})
        log_dict(c, run_id, train_config, "config/train_config.json")
        result, cached = run_stage(pretrain, train_config=train_config, tokenizer_path=tok["path"], mlflow_run_id=run_id)
        if cached:  # the metrics streamed into the run that trained it
            log_metric_rows(c, run_id, read_metric_rows(Path(result["metrics_file"])))
        s = result["summary"]
        log_metrics(c, run_id, {k: v for k, v in s.items() if isinstance(v, (int, float))}, step=s["steps"])
        stages.done("pretrain", cached, f"steps {s['init_step']} -> {s['steps']}, val/loss {s['val/loss']:.3f}")
        step_ckpt = Path(result["out_dir"]) / "checkpoints" / f"step-{s['steps']:07d}"
        resume_point = str(step_ckpt if step_ckpt.is_dir() else result["checkpoint"])

        heldout = _heldout(cc, ws, db, c, done, snapshot_id, tok, example_config, result["checkpoint"],
                           champ.tags["weights"] if champ else None, tc.batch_size)
        stages.done("held-out loss", False, ", ".join(
            f"{k[:8]} {v['candidate']:.3f}" for k, v in heldout.items() if not math.isnan(v["candidate"])))
        metrics = {}
        for snap_k, v in heldout.items():
            metrics[f"heldout/{snap_k[:8]}/loss"] = v["candidate"]
            if champ and not math.isnan(v["champion"]):
                metrics[f"heldout/{snap_k[:8]}/champion_loss"] = v["champion"]
                key = "gain" if snap_k == snapshot_id else "forgetting"
                diff = v["champion"] - v["candidate"] if key == "gain" else v["candidate"] - v["champion"]
                metrics[f"{key}/{snap_k[:8]}"] = diff
        old = [v for k, v in heldout.items() if k != snapshot_id]
        cand_scores = registry.Scores(old_loss=_mean([v["candidate"] for v in old]))
        champ_scores = registry.Scores(old_loss=_mean([v["champion"] for v in old])) if champ else None

        has_task = task_info is not None
        if has_task:
            score, champ_score = _downstream(cfg, c, exp_id, run_id, db, task_info, tok, result["checkpoint"],
                                             champ, tags, stages)
            cand_scores.score = score
            if champ_scores:
                champ_scores.score = champ_score
            metrics["downstream/validation_accuracy"] = score
        decision = registry.apply_gate(cand_scores, champ_scores, cc.gate)
        metrics.update(registry.gate_metrics(decision))
        log_metrics(c, run_id, {k: v for k, v in metrics.items() if not math.isnan(v)}, step=update_no)
        c.set_tag(run_id, "gate.decision", decision.decision)
        c.set_tag(run_id, "gate.reasons", decision.summary()[:5000])

        c.log_artifact(run_id, tok["path"])
        c.log_artifacts(run_id, result["hf_dir"], "hf_model")
        version = registry.register(c, name, f"{c.get_run(run_id).info.artifact_uri}/hf_model", run_id, {
            "snapshot_id": snapshot_id, "checkpoint": resume_point, "weights": result["checkpoint"],
            "tokenizer": tok["path"], "objective": cc.objective, "steps": s["steps"], "init_step": s["init_step"],
            "update": update_no, "base_snapshot_id": base_snapshot or ""},
            description=f"update {update_no}: continued from {f'version {champ.version}' if champ else 'scratch'} "
                        f"on snapshot {snapshot_id}")
        registry.record_gate(c, name, version, decision)
        if decision.passed:
            registry.promote(c, name, alias, version)
        c.set_tag(run_id, "model_version", version)
        stages.done("gate + registry", False, f"version {version}: {decision.summary()}"
                                              + (f"; alias {alias!r} moved" if decision.passed else "; alias kept"))
        report = _report(cc, ws, c, run_id, version, decision, champ, update_no, has_task)
        stages.done("report", False, report["markdown_path"], computes=False)
        status = "FINISHED"
    finally:
        c.set_terminated(run_id, status)
    verb = "took" if decision.passed else "did not take"
    return {"status": "trained", "trained": True, "snapshot_id": snapshot_id, "version": version,
            "champion_version": version if decision.passed else (str(champ.version) if champ else None),
            "gate": registry.as_dict(decision), "summary": s, "run_id": run_id, "experiment_id": exp_id,
            "heldout": heldout, "report": report["markdown_path"], "plot": report["plot"],
            "message": f"update {update_no} on snapshot {snapshot_id}: version {version} {verb} alias {alias!r} "
                       f"(gate {decision.decision}; steps {s['init_step']} -> {s['steps']})"}


def _mean(values: list[float]) -> float:
    ok = [v for v in values if not math.isnan(v)]
    return sum(ok) / len(ok) if ok else math.nan


def _heldout(cc, ws, db, c, done, snapshot_id, tok, example_config, candidate_ckpt, champion_ckpt, batch_size) -> dict:
    """Held-out loss of the candidate and the champion on each processed snapshot's new validation documents."""
    from flows.config import config_hash
    from tasks.caching import run_stage

    order = list(dict.fromkeys([v.tags["snapshot_id"] for v in done] + [snapshot_id]))
    out = {}
    for i, snap_k in enumerate(order):
        prev = order[i - 1] if i else None
        rows_path = ws.stage_dir("continual", cc.registered_model) / "heldout" / (
            f"{snap_k}-{(prev or 'first')[:8]}-{config_hash([tok['path'], example_config])[:8]}.npy")
        rows, _ = run_stage(heldout_rows, db_path=db, snapshot_id=snap_k, previous_snapshot_id=prev,
                            tokenizer_path=tok["path"], example_config=example_config, out_path=str(rows_path))
        entry = {"rows": rows["rows"], "documents": rows["documents"], "candidate": math.nan, "champion": math.nan}
        if rows["rows"]:
            for who, ckpt in (("candidate", candidate_ckpt), ("champion", champion_ckpt)):
                if ckpt:
                    loss, _ = run_stage(heldout_loss, checkpoint=ckpt, checkpoint_digest=_digest(ckpt),
                                        rows_path=str(rows_path), rows_digest=rows["sha256"], batch_size=batch_size)
                    entry[who] = loss["val/loss"]
        else:
            get_run_logger().warning("snapshot %s's new validation documents (%d) make no held-out row; its loss is "
                                     "not measured (raise corpus.val_frac or drop more data)", snap_k, rows["documents"])
        out[snap_k] = entry
    return out


def _digest(checkpoint: str) -> str:
    from model.checkpoint import MARKER, sha256_file

    return sha256_file(Path(checkpoint) / MARKER)


def _downstream(cfg, c, exp_id, run_id, db, task_info, tok, checkpoint, champ, tags, stages) -> tuple[float, float]:
    """Mean validation accuracy over seeds (first method) of the candidate and of the champion."""
    from flows.matrix import log_cell, run_cells
    from tasks import report as reporting
    from tasks.tracking import log_metrics

    methods = cfg.downstream.method_configs()
    variants = [{"name": "candidate", "objective": cfg.objectives[0], "size": cfg.model.size, "run_id": run_id,
                 "checkpoint": checkpoint}]
    if champ:
        variants.append({"name": f"champion-v{champ.version}", "objective": cfg.objectives[0], "size": cfg.model.size,
                         "run_id": run_id, "checkpoint": champ.tags["weights"]})
    by_name = {v["name"]: v for v in variants}
    common = {"db_path": db, "task_name": task_info["name"], "labels": task_info["labels"], "tokenizer_path": tok["path"],
              "specials": tok["specials"]}

    def on_done(cell: dict, cached: bool) -> None:
        log_cell(c, exp_id, by_name[cell["variant"]], cell, task_info["name"], tags)
        what = (f"failed: {cell['error'][:120]}" if cell.get("error") else
                f"validation accuracy {cell['scores']['validation']['accuracy']:.3f}")
        stages.done(f"finetune {cell['variant']} {cell['method']} s{cell['seed']}", cached, what)

    cells = run_cells(variants, methods, cfg.downstream.seeds, common, cfg.study, on_done)
    failed = [x for x in cells if x.get("error")]
    if failed:
        raise RuntimeError(f"fine-tuning {failed[0]['variant']} failed: {failed[0]['error']}")
    first = next(iter(methods))
    score = reporting.cell_summary(cells, "candidate", first, "validation")["accuracy"][0]
    champ_score = reporting.cell_summary(cells, variants[-1]["name"], first, "validation")["accuracy"][0] if champ else math.nan
    log_metrics(c, run_id, {"downstream/test_accuracy": reporting.cell_summary(cells, "candidate", first)["accuracy"][0]})
    return score, champ_score


def _texts(db: str, ids: list[str], batch: int = 2048) -> Iterator[list[str]]:
    """Texts of `ids` in doc_id order, in batches."""
    import pyarrow as pa

    from warehouse.store import connect

    with connect(db, read_only=True) as con:
        con.register("wanted", pa.table({"doc_id": sorted(ids)}))
        cur = con.execute("SELECT d.text FROM documents d JOIN wanted USING (doc_id) ORDER BY d.doc_id")
        while rows := cur.fetchmany(batch):
            yield [r[0] for r in rows]


def _members(con, snapshot_id: str, split: str | None = None) -> list[str]:
    sql = "SELECT doc_id FROM snapshot_documents WHERE snapshot_id = ?" + (" AND split = ?" if split else "")
    return [r[0] for r in con.execute(sql + " ORDER BY doc_id", [snapshot_id, *([split] if split else [])]).fetchall()]


def _unit(key: str, salt: str) -> float:
    return int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()[:12], 16) / 16**12


def update_documents(db: str, snapshot_id: str, base_snapshot_id: str | None, replay: float) -> dict[str, list[str]]:
    """Doc ids an update trains and validates on: the snapshot's training documents the base (the
    champion's snapshot) lacks, plus the base's training documents whose hash falls under `replay`
    (the same ones every time); validation and test are the snapshot's own."""
    from warehouse.store import connect

    with connect(db, read_only=True) as con:
        current = {split: _members(con, snapshot_id, split) for split in SPLITS}
        base = set(_members(con, base_snapshot_id)) if base_snapshot_id else set()
        base_train = _members(con, base_snapshot_id, "train") if base_snapshot_id else []
    new = [d for d in current["train"] if d not in base]
    replayed = [d for d in base_train if _unit(d, "replay") < replay]
    return {"train": new + replayed, "validation": current["validation"], "test": current["test"],
            "new": new, "replay": replayed}


@task(name="update-data", cache_key_fn=stage_cache_key("warehouse", "flows"), **CACHED)
def update_shards(db_path: str, snapshot_id: str, base_snapshot_id: str | None, replay: float, tokenizer_path: str,
                  out_dir: str) -> dict:
    """Token shards (warehouse/shards.py layout) of an update's documents, so the objective's example
    maker reads them like a snapshot's."""
    from tokenizers import Tokenizer

    from warehouse.shards import META, file_sha256, token_dtype, write_split

    ids = update_documents(db_path, snapshot_id, base_snapshot_id, replay)
    tok = Tokenizer.from_file(tokenizer_path)
    dtype = token_dtype(tok.get_vocab_size())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)  # incomplete until meta.json lands again
    counts = {split: write_split(tok, _texts(db_path, ids[split]), out, split, dtype) for split in SPLITS}
    meta = {"snapshot_id": snapshot_id, "base_snapshot_id": base_snapshot_id, "replay": replay, "dtype": dtype.str,
            "tokenizer_sha256": file_sha256(tokenizer_path), "vocab_size": tok.get_vocab_size(), "splits": counts}
    _write_json(out / META, meta)
    return {"splits": counts, "new_documents": len(ids["new"]), "replay_documents": len(ids["replay"]),
            "dir": out_dir, "outputs": [str(out / META)]}


@task(name="heldout-rows", cache_key_fn=stage_cache_key("model", "warehouse", "flows"), **CACHED)
def heldout_rows(db_path: str, snapshot_id: str, previous_snapshot_id: str | None, tokenizer_path: str,
                 example_config: dict, out_path: str) -> dict:
    """The objective's rows of a snapshot's validation documents that the previous processed snapshot lacks."""
    import numpy as np
    from tokenizers import Tokenizer

    from model.config import TrainConfig
    from model.data import save_rows, word_starts
    from model.objectives import get_objective
    from warehouse.shards import file_sha256, token_dtype
    from warehouse.store import connect

    with connect(db_path, read_only=True) as con:
        ids = _members(con, snapshot_id, "validation")
        if previous_snapshot_id:
            ids = sorted(set(ids) - set(_members(con, previous_snapshot_id)))
    texts = [t for batch in _texts(db_path, ids) for t in batch]
    tok = Tokenizer.from_file(tokenizer_path)
    dtype = token_dtype(tok.get_vocab_size())
    encoded = [np.array(e.ids, dtype=dtype) for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
    tokens = np.concatenate(encoded) if encoded else np.empty(0, dtype=dtype)
    offsets = np.cumsum([0] + [len(x) for x in encoded]).astype(np.int64)
    cfg = load_dataclass(TrainConfig, example_config)
    rows = get_objective(cfg.objective).make_examples(tokens, offsets, cfg, cfg.specials, word_starts(tokenizer_path))
    save_rows(Path(out_path), rows)
    return {"rows": int(len(rows)), "documents": len(texts), "path": out_path, "sha256": file_sha256(out_path),
            "outputs": [out_path]}


@task(name="heldout-loss", cache_key_fn=stage_cache_key("model", exclude=("checkpoint", "rows_path")), **CACHED)
def heldout_loss(checkpoint: str, checkpoint_digest: str, rows_path: str, rows_digest: str, batch_size: int) -> dict:
    """The checkpoint's loss (and objective statistics) on every row, the same masks for every model."""
    import numpy as np

    from model.checkpoint import load_pretrained
    from model.train import autocast_for, evaluate, resolve_device

    model, cfg = load_pretrained(checkpoint)
    rows = np.load(rows_path, mmap_mode="r")
    cfg.batch_size, cfg.eval_batches = batch_size, math.ceil(len(rows) / batch_size)
    device = resolve_device("auto")
    return evaluate(model.to(device), rows, cfg, device, autocast_for(cfg, device))


def history(c, name: str) -> list[dict]:
    """One entry per registered version: its snapshot, gate, steps and held-out losses (from its run)."""
    from tasks import registry

    out = []
    for v in registry.versions(c, name):
        metrics = c.get_run(v.run_id).data.metrics if v.run_id else {}
        losses = {k.split("/")[1]: val for k, val in metrics.items() if k.startswith("heldout/") and k.endswith("/loss")}
        out.append({"version": str(v.version), "snapshot_id": v.tags.get("snapshot_id", ""), "gate": v.tags.get("gate", ""),
                    "steps": int(v.tags.get("steps", 0)), "init_step": int(v.tags.get("init_step", 0)),
                    "losses": losses, "run_id": v.run_id,
                    "forgetting": _mean([val for k, val in metrics.items() if k.startswith("forgetting/")]),
                    "gain": _mean([val for k, val in metrics.items() if k.startswith("gain/")])})
    return out


def plot_forgetting(rows: list[dict], path: Path) -> Path:
    """Held-out loss on each snapshot's data (one line each) over the sequence of updates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.report import COLORS

    sets = list(dict.fromkeys(k for r in rows for k in r["losses"]))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) + 3), 4))
    x = list(range(1, len(rows) + 1))
    for i, key in enumerate(sets):
        pts = [(n, r["losses"][key]) for n, r in zip(x, rows) if key in r["losses"]]
        ax.plot(*zip(*pts), color=COLORS[i % 10], label=f"data of snapshot {key}", marker="o")
        rejected = [(n, r["losses"][key]) for n, r in zip(x, rows) if key in r["losses"] and r["gate"] == "failed"]
        if rejected:
            ax.scatter(*zip(*rejected), marker="x", s=90, color="black", zorder=3)
    ax.set_xticks(x, [f"v{r['version']}\n{r['snapshot_id'][:8]}" for r in rows])
    ax.set_xlabel("update (model version, snapshot); x: the gate rejected it")
    ax.set_ylabel("held-out loss (nats)")
    ax.set_title("forgetting: loss on each snapshot's held-out data over the updates")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report_markdown(cc: ContinualConfig, rows: list[dict], decision, version: str, champ, has_task: bool) -> str:
    sets = list(dict.fromkeys(k for r in rows for k in r["losses"]))
    current = rows[-1]
    verb = "took" if decision.passed else "did not take"
    lines = [f"# Continual pretraining: `{cc.registered_model}`", "",
             f"Update {len(rows)} on snapshot `{current['snapshot_id']}`: version {version} {verb} the alias "
             f"`{cc.alias}` (continued from {f'version {champ.version}' if champ else 'scratch'}; steps "
             f"{current['init_step']} -> {current['steps']}; optimizer {cc.init_optimizer}, replay {cc.replay:g}).",
             "", "## Gate", "", "| check | champion | candidate | change | tolerance |", "|---|---:|---:|---:|---:|"]
    n = decision.numbers

    def num(key: str) -> str:
        value = n.get(key, math.nan)
        return "-" if math.isnan(value) else f"{value:.4f}"

    lines.append(f"| held-out loss on earlier snapshots' data | {num('champion_old_loss')} | {num('candidate_old_loss')} | "
                 f"{num('old_loss_increase')} | +{cc.gate.max_old_loss_increase:g} |")
    if has_task:
        drop = n.get("score_drop", math.nan)
        change = "-" if math.isnan(drop) else f"{-drop:+.4f}"
        lines.append(f"| downstream validation accuracy | {num('champion_score')} | {num('candidate_score')} | "
                     f"{change} | -{cc.gate.max_score_drop:g} |")
    lines += ["", f"Decision: **{decision.decision}**: " + "; ".join(decision.reasons) + ".", "",
              "## Held-out loss on each snapshot's new validation documents", "",
              "Rows are updates (each candidate, accepted or not); columns the data of each snapshot. "
              "Forgetting: the change of loss on earlier data against the model it continued from; gain: the "
              "fall of loss on the new data.", "",
              "| version | snapshot | steps | gate | forgetting | gain | " + " | ".join(f"`{k}`" for k in sets) + " |",
              "|---|---|---:|---|---:|---:|" + "---:|" * len(sets)]
    for r in rows:
        cells = [f"{r['losses'][k]:.3f}" if k in r["losses"] else "" for k in sets]
        f = "-" if math.isnan(r["forgetting"]) else f"{r['forgetting']:+.3f}"
        g = "-" if math.isnan(r["gain"]) else f"{r['gain']:+.3f}"
        lines.append(f"| {r['version']} | `{r['snapshot_id'][:8]}` | {r['steps']} | {r['gate']} | {f} | {g} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _report(cc, ws, c, run_id, version, decision, champ, update_no, has_task) -> dict:
    from prefect.artifacts import create_image_artifact, create_markdown_artifact

    from tasks.report import MLFLOW_UI

    rows = history(c, cc.registered_model)
    out = ws.stage_dir("continual", cc.registered_model) / "reports" / f"{update_no:03d}-{run_id}"
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_forgetting(rows, out / "forgetting.png")
    markdown = report_markdown(cc, rows, decision, version, champ, has_task)
    (out / "continual_report.md").write_text(markdown + "\n![forgetting](forgetting.png)\n")
    c.log_artifacts(run_id, str(out))
    key = re.sub(r"[^a-z0-9-]+", "-", f"continual-{cc.registered_model}".lower())
    url = f"{MLFLOW_UI}/get-artifact?path=forgetting.png&run_uuid={run_id}"
    create_markdown_artifact(markdown=markdown + f"\n![forgetting]({url})\n", key=key,
                             description=f"continual pretraining of {cc.registered_model}: update {update_no}")
    create_image_artifact(image_url=url, key=f"{key}-forgetting", description="held-out loss per snapshot over the updates")
    return {"markdown_path": str(out / "continual_report.md"), "plot": str(plot), "markdown": markdown}
