"""Scaling laws: `pretrain-scaling` (`pretrain scale --config configs/studies/scaling.yaml`).

A grid of model sizes x compute budgets: one pretraining run per cell, each stopped at its FLOP
budget (`train.max_flops`, counted by the trainer's own accounting) with a learning-rate schedule
sized to its own number of steps (warmup over the first `warmup_frac` of them, cosine decay to the
last). Hoffmann et al. (2022) found that a cosine cycle longer than the run overstates the loss of
the shorter runs; sizing each schedule to its run is what makes the final losses comparable.

The runs are the pipeline's: its data stages (ingest -> snapshot + split -> tokenizer -> token
shards -> examples) and its cached `pretrain` task, so a re-run trains only what changed or failed.
The final held-out loss, non-embedding parameters N, training tokens D and FLOPs C of every run are
fitted (`tasks/scaling_fit.py`) two ways, each with bootstrap intervals over the runs:
- approach 2: the minimum of each budget's iso-FLOP curve; N_opt ~ C^a and D_opt ~ C^b;
- approach 3: L(N, D) = E + A / N^alpha + B / D^beta, Huber loss on log-loss;
and the largest run (largest N at the largest budget) is predicted by a fit on the others. The
report (markdown, PNGs) is in the MLflow parent run and is the flow run's Prefect artefact; every
run is an MLflow child run with its N, D, C and loss.
"""
from __future__ import annotations

import contextvars
import copy
import csv
import json
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact
from prefect.runtime import flow_run

from flows.config import PipelineConfig, config_hash, read_study_sections
from flows.pipeline import Stages, StudyIncomplete, _prepare, parent_run
from flows.strategies import _placeholders
from model.config import SIZES, ConfigError, ModelConfig, TrainConfig, load_dataclass, run_identity, to_dict
from model.objectives import EXAMPLE_KEYS, OBJECTIVES, get_objective, preset
from tasks import report as reporting
from tasks.caching import run_stage, stage_cache_key
from tasks.workspace import Workspace, git_commit

CACHED = dict(persist_result=True, result_serializer="json")
# N counts one Transformer stack's parameters; these objectives train two.
MULTI_STACK = {"electra": "a generator and a discriminator", "t5": "an encoder and a decoder"}
DIMENSIONS = tuple(SIZES["tiny"])  # what a size given by its dimensions must name
# Published values the report sets beside the fitted ones.
HOFFMANN = {"approach 2": {"a": (0.49, 0.462, 0.534), "b": (0.51, 0.483, 0.529)},
            "approach 3": {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28, "a": 0.46, "b": 0.54}}
KAPLAN = {"a": 0.73, "b": 0.27}


@dataclass
class ScalingConfig:
    """The `scaling:` section; the rest of the file is a pipeline config (corpus, tokenizer, model, train)."""

    objective: str = "clm"
    # name -> a named size (tiny, mini, ...) or its dimensions {n_layers, d_model, n_heads, d_ff}
    sizes: dict[str, Any] = field(default_factory=dict)
    budgets: list[float] = field(default_factory=list)  # training FLOPs of each run (train.max_flops)
    warmup_frac: float = 0.1  # warmup steps as a fraction of each run's own steps
    eval_rows: int = 2048  # every final model is scored on the first this-many validation rows
    n_boot: int = 200  # bootstrap replicates of each fit; 0: no intervals
    level: float = 0.95
    seed: int = 0  # of the bootstrap
    fit_starts: int = 0  # L-BFGS-B starts of L(N, D): the best k of the initial grid; 0: the whole grid
    require_interior: bool = True  # approach 2 uses a budget only when its minimum lies within its sizes
    # Approach 2's parabola through the runs of this many sizes around each budget's best run; 0: all of them.
    isoflop_window: int = 0
    max_parallel: int = 1  # runs trained at once, the CPU threads shared out between them

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"scaling.objective={self.objective!r} is unknown; use one of {', '.join(OBJECTIVES)}")
        if self.objective in MULTI_STACK:
            raise ConfigError(f"scaling.objective={self.objective} trains {MULTI_STACK[self.objective]}, and N counts "
                              "the parameters of one stack; use clm, mlm or prefix-lm")
        if len(self.sizes) < 3:
            raise ConfigError(f"scaling.sizes has {len(self.sizes)} size(s); an iso-FLOP curve needs at least 3, e.g. "
                              "{s: {n_layers: 1, d_model: 64, n_heads: 2, d_ff: 256}, m: tiny, l: mini}")
        if len(set(self.budgets)) < 2 or min(self.budgets) <= 0:
            raise ConfigError(f"scaling.budgets={self.budgets} needs at least 2 different positive FLOP budgets, "
                              "e.g. [1.0e12, 3.0e12, 1.0e13]")
        for key, ok, want in (("warmup_frac", 0 <= self.warmup_frac < 1, "in [0, 1)"),
                              ("eval_rows", self.eval_rows >= 1, "at least 1"), ("n_boot", self.n_boot >= 0, ">= 0"),
                              ("level", 0 < self.level < 1, "in (0, 1)"), ("fit_starts", self.fit_starts >= 0, ">= 0"),
                              ("max_parallel", self.max_parallel >= 1, "at least 1"),
                              ("isoflop_window", self.isoflop_window == 0 or self.isoflop_window >= 3,
                               "0 (every size) or at least 3 (a parabola's points)")):
            if not ok:
                raise ConfigError(f"scaling.{key}={getattr(self, key)!r} must be {want}")


# Keys the scaling section decides; setting them elsewhere would be silently overridden.
OWNED = {("objectives",): "scaling.objective", ("model", "size"): "scaling.sizes",
         ("study", "sizes"): "scaling.sizes", ("train", "max_steps"): "scaling.budgets",
         ("train", "max_flops"): "scaling.budgets", ("train", "warmup_steps"): "scaling.warmup_frac",
         ("train", "eval_interval"): "the end of each run (automatic)", ("train", "eval_batches"): "scaling.eval_rows",
         ("train", "init_from"): "nothing: every run starts from scratch",
         ("downstream",): "nothing: a scaling study fine-tunes nothing"}


def load_scaling_config(path: str | Path, overrides: list[str] | None = None) -> tuple[ScalingConfig, PipelineConfig]:
    section, data = read_study_sections(path, overrides or [], "scaling", OWNED)
    sc = load_dataclass(ScalingConfig, section, "scaling.")
    d = copy.deepcopy(data)
    ws = Workspace.from_env()
    corpus = d.get("corpus") if isinstance(d.get("corpus"), dict) else {}
    for spec in [corpus] + [x for x in corpus.get("sources") or [] if isinstance(x, dict)]:
        if isinstance(spec.get("path"), str):  # $SITE_PACKAGES, $PRETRAIN_HOME as in a strategies config
            spec["path"] = _placeholders(spec["path"], ws)
    d.setdefault("experiment", "study-scaling")
    d["objectives"], d["downstream"] = [sc.objective], {"task": "none"}
    cfg = load_dataclass(PipelineConfig, d).validate()
    arch = get_objective(sc.objective).ARCH
    for name, spec in sc.sizes.items():  # every size builds, now rather than after the data stages
        size_config(cfg, arch, cfg.tokenizer.vocab_size, name, spec)
    return sc, cfg


def size_config(cfg: PipelineConfig, arch: str, vocab_size: int, name: str, spec: Any) -> ModelConfig:
    """A named size, or one given by its dimensions; `model.overrides` (dropout, position, ...) apply to both."""
    if isinstance(spec, str):
        try:
            return cfg.model_config(arch, vocab_size, spec)
        except ConfigError as exc:
            raise ConfigError(f"scaling.sizes.{name}: {exc}") from None
    missing = [k for k in DIMENSIONS if k not in spec] if isinstance(spec, dict) else list(DIMENSIONS)
    if missing:
        raise ConfigError(f"scaling.sizes.{name} must be a size name ({', '.join(SIZES)}) or all of "
                          f"{', '.join(DIMENSIONS)}; {missing[0]} is missing")
    unknown = sorted(set(spec) - set(ModelConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"unknown config key 'scaling.sizes.{name}.{unknown[0]}'; a size sets "
                          f"{', '.join(DIMENSIONS)} (other model settings go under model.overrides)")
    custom = copy.deepcopy(cfg)
    custom.model.overrides = {**custom.model.overrides, **spec}
    try:
        return custom.model_config(arch, vocab_size, "custom")
    except ConfigError as exc:
        raise ConfigError(f"scaling.sizes.{name}: {exc}") from None


def measure(objective: str, model: ModelConfig, train: TrainConfig) -> dict:
    """Non-embedding parameters N and training FLOPs per token, from the model itself built on the
    meta device (no memory, no initialisation): the same accounting the trainer stops at."""
    import torch

    with torch.device("meta"):
        m = get_objective(objective).build(model, train, train.specials)
    return {"N": int(m.backbone.num_params(non_embedding=True)), "flops_per_token": float(m.flops_per_token(train.seq_len)),
            "params": int(sum(p.numel() for p in m.parameters()))}


def budget_label(budget: float) -> str:
    return f"{budget:.2g}".replace("e+", "e")


@flow(name="pretrain-scaling", log_prints=True)
def pretrain_scaling(config_path: str = "studies/scaling.yaml", overrides: list[str] | None = None) -> dict:
    """Model sizes x FLOP budgets, iso-FLOP frontier and L(N, D) with intervals, and an extrapolation check."""
    sc, cfg = load_scaling_config(config_path, overrides or [])
    ws, logger = Workspace.from_env(), get_run_logger()
    with parent_run(ws, cfg.experiment, "scaling", config_path, logger) as (c, exp_id, parent):
        return _study(sc, cfg, ws, c, exp_id, parent, logger)


def _study(sc: ScalingConfig, cfg: PipelineConfig, ws: Workspace, c, exp_id: str, parent: str, logger) -> dict:
    """The pipeline diagram of the study: data stages -> examples -> one run per (size, budget) -> fits -> report."""
    stages = Stages(4 + 1 + len(sc.sizes) * len(sc.budgets) + 2)
    data = _prepare(cfg, str(ws.warehouse), ws, stages, has_task=False)  # ingest, snapshot + split, tokenizer, shards
    base, examples = _examples(sc, cfg, data, ws, stages)
    models = _sizes(sc, cfg, base, data["tokenizer"])
    context = _log_study(sc, cfg, c, exp_id, parent, base, data, examples, models)
    runs = train_grid(sc, cfg, ws, c, exp_id, parent, base, models, data["tokenizer"], context, stages, logger)
    ok = [r for r in runs if not r.get("error")]
    fits, cached = run_stage(fit_scaling_laws, points=[{k: r[k] for k in ("budget", "N", "D", "C", "loss")} for r in ok],
                             n_boot=sc.n_boot, level=sc.level, seed=sc.seed, top_k=sc.fit_starts,
                             require_interior=sc.require_interior, window=sc.isoflop_window)
    stages.done("fits", cached, fit_summary(fits))
    _log_fits(c, parent, fits)
    report = write_report(sc, ws, c, parent, runs, models, fits, context)
    stages.done("report", False, report["markdown_path"], computes=False)
    # A fit the finished runs cannot support is a finding, said in the report; a failed run is retried by a re-run.
    failures = [f"{r['name']}: {r['error']}" for r in runs if r.get("error")]
    if failures:
        raise StudyIncomplete(f"{len(failures)} part(s) of the study failed, the report lists them "
                              f"({report['markdown_path']}); first: {failures[0]}")
    return {"experiment": cfg.experiment, "experiment_id": exp_id, "parent_run_id": parent,
            "flow_run_id": context["flow_run_id"], "runs": runs, "fits": fits, "models": {
                k: {x: m[x] for x in ("N", "flops_per_token", "params")} for k, m in models.items()},
            "report": report["markdown_path"], "html": report["html_path"], "markdown": report["markdown"],
            "plots": report["plots"], "cached_stages": stages.cached, "ran_stages": stages.ran}


def _examples(sc: ScalingConfig, cfg: PipelineConfig, data: dict, ws: Workspace, stages: Stages) -> tuple[TrainConfig, dict]:
    """The training config every run starts from, and one set of example rows for all of them: the sizes
    and budgets differ, the data does not."""
    from tasks.data import make_examples

    base = load_dataclass(TrainConfig, preset(sc.objective, cfg.train))
    base.objective, base.specials = sc.objective, data["tokenizer"]["specials"]
    example_config = {k: getattr(base, k) for k in (*EXAMPLE_KEYS, "specials")}
    ex_dir = ws.stage_dir("examples", f"{sc.objective}-{config_hash(example_config)}-{Path(data['shard_dir']).name}")
    examples, cached = run_stage(make_examples, train_config=example_config, shard_dir=str(data["shard_dir"]),
                                 tokenizer_path=data["tokenizer"]["path"], out_dir=str(ex_dir))
    stages.done("examples", cached, f"rows {examples['rows']}")
    if not examples["rows"]["validation"]:
        raise ConfigError(f"the validation split makes no example of train.seq_len={base.seq_len} tokens: every run "
                          "is scored on it; raise corpus.val_frac or lower train.seq_len")
    base.data_dir = examples["dir"]
    base.eval_batches = math.ceil(min(sc.eval_rows, examples["rows"]["validation"]) / base.batch_size)
    if sc.max_parallel > 1 and not cfg.train.get("num_threads"):  # the CPU threads shared out between the runs
        base.num_threads = max(1, (os.cpu_count() or 1) // sc.max_parallel)
    return base, examples


def _sizes(sc: ScalingConfig, cfg: PipelineConfig, base: TrainConfig, tok: dict) -> dict:
    """Each size's model config, N and FLOPs per token at the tokenizer's real vocabulary."""
    arch = get_objective(sc.objective).ARCH
    models = {}
    for name, spec in sc.sizes.items():
        model = size_config(cfg, arch, tok["vocab_size"], name, spec)
        models[name] = {"config": model, **measure(sc.objective, model, base)}
    return models


def _log_study(sc, cfg, c, exp_id: str, parent: str, base: TrainConfig, data: dict, examples: dict, models: dict) -> dict:
    """The parent run's parameters and resolved config; returns what the report says of the study."""
    from tasks.tracking import log_dict, log_params

    tok = data["tokenizer"]
    context = {"snapshot_id": data["snapshot_id"], "n_documents": data["n_documents"], "vocab_size": tok["vocab_size"],
               "train_tokens": examples["rows"]["train"] * base.seq_len, "eval_rows": base.eval_batches * base.batch_size,
               "experiment": cfg.experiment, "experiment_id": exp_id, "parent_run_id": parent,
               "flow_run_id": str(flow_run.get_id() or ""), "flow_run_name": flow_run.get_name() or "",
               "tags": {"snapshot_id": data["snapshot_id"], "git_commit": git_commit()}}
    log_params(c, parent, {"objective": sc.objective, "snapshot_id": data["snapshot_id"], "vocab_size": tok["vocab_size"],
                           "train_tokens": context["train_tokens"], "budgets": ",".join(map(budget_label, sorted(sc.budgets))),
                           "sizes": ",".join(sc.sizes), "warmup_frac": sc.warmup_frac, "lr": base.lr,
                           "batch_size": base.batch_size, "seq_len": base.seq_len, "n_boot": sc.n_boot})
    log_dict(c, parent, {"scaling": asdict(sc), "pipeline": asdict(cfg),
                         "sizes": {k: {**to_dict(m["config"]), **{x: m[x] for x in ("N", "flops_per_token", "params")}}
                                   for k, m in models.items()}}, "scaling_config.json")
    c.log_artifact(parent, tok["path"])
    return context


def train_grid(sc, cfg, ws, c, exp_id, parent, base, models, tok, context, stages, logger) -> list[dict]:
    """Every (size, budget) run, the small budgets first, `max_parallel` at once (they share nothing but
    the examples); returned in grid order."""
    from tasks.training import stop_running_trainers

    lock = threading.Lock()

    def done(*args) -> None:
        with lock:
            stages.done(*args)

    grid = [(size, budget) for budget in sorted(sc.budgets) for size in sc.sizes]
    pool = ThreadPoolExecutor(max_workers=sc.max_parallel)
    futures = [pool.submit(contextvars.copy_context().run, train_cell, sc, cfg, ws, c, exp_id, parent, base, size,
                           models[size], budget, tok, context, done, logger)
               for size, budget in grid]  # each thread in the flow run's context
    try:
        runs = [f.result() for f in futures]
    except BaseException:  # stopped (SIGTERM, Ctrl-C): the signal reached this thread, not the trainers' ones
        pool.shutdown(wait=False, cancel_futures=True)
        stop_running_trainers()  # each saves a checkpoint: a re-run resumes it
        raise
    pool.shutdown()
    return runs


def train_cell(sc, cfg, ws, c, exp_id, parent, base, size, model, budget, tok, context, done, logger) -> dict:
    """One (size, budget) run: its schedule sized to the steps the budget buys; a failure is recorded, not raised."""
    from model.train import total_steps
    from tasks.tracking import log_dict, log_metric_rows, log_metrics, log_params, read_metric_rows, start_run
    from tasks.training import pretrain

    name = f"{size}@{budget_label(budget)}"
    cell = {"name": name, "size": size, "budget": float(budget), "N": model["N"], "run_id": ""}
    tc = copy.deepcopy(base)
    tc.model, tc.max_flops = model["config"], float(budget)
    try:
        cell["run_id"] = start_run(c, exp_id, name, parent=parent, tags=context["tags"])
        steps = total_steps(tc, model["flops_per_token"] * tc.batch_size * tc.grad_accum_steps * tc.seq_len)
        tc.max_steps, tc.eval_interval = steps, steps  # scored once, at the end
        tc.warmup_steps = max(1, round(sc.warmup_frac * steps))
        tc.log_interval = int(cfg.train.get("log_interval") or max(1, steps // 25))
        tc.out_dir = str(ws.stage_dir("runs", f"scaling-{sc.objective}-{config_hash(run_identity(tc))}"))
        log_params(c, cell["run_id"], {"size": size, "budget": budget, "objective": sc.objective, "steps": steps,
                                       "warmup_steps": tc.warmup_steps, "lr": tc.lr, "batch_size": tc.batch_size,
                                       "seq_len": tc.seq_len, "flops_per_token": model["flops_per_token"],
                                       **{k: getattr(tc.model, k) for k in DIMENSIONS}})
        log_dict(c, cell["run_id"], to_dict(tc), "config/train_config.json")
        result, cached = run_stage(pretrain.with_options(task_run_name=f"pretrain-{name}"), train_config=to_dict(tc),
                                   tokenizer_path=tok["path"], mlflow_run_id=cell["run_id"])
    except Exception as exc:  # noqa: BLE001 - one run's failure must not stop the others
        message = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
        logger.error("run %s failed: %s", name, message)
        if cell["run_id"]:
            c.set_tag(cell["run_id"], "error", message[:5000])
            c.set_terminated(cell["run_id"], "FAILED")
        done(f"pretrain {name}", False, f"[red]failed[/red]: {message[:160]}")
        return {**cell, "error": message}
    if cached:  # the curve streamed into the run that trained it; copy it here
        log_metric_rows(c, cell["run_id"], read_metric_rows(Path(result["metrics_file"])))
        c.set_tag(cell["run_id"], "trained_in_run", result["mlflow_run_id"] or "")
    s = result["summary"]
    cell.update({"D": float(s["tokens_seen"]), "C": float(s["pretrain_flops"]), "loss": float(s["val/loss"]),
                 "steps": s["steps"], "warmup_steps": tc.warmup_steps, "flops_per_token": model["flops_per_token"],
                 "epochs": s["tokens_seen"] / context["train_tokens"], "metrics_file": result["metrics_file"],
                 "seconds": s.get("train_seconds", 0.0)})
    log_metrics(c, cell["run_id"], {"scaling/N": cell["N"], "scaling/D": cell["D"], "scaling/C": cell["C"],
                                    "scaling/loss": cell["loss"], "scaling/epochs": cell["epochs"],
                                    "n_params": s["n_params"]}, step=s["steps"])
    c.set_terminated(cell["run_id"], "FINISHED")
    done(f"pretrain {name}", cached, f"N {cell['N']:,}, D {cell['D']:,.0f}, C {cell['C']:.2e}: "
                                            f"held-out loss {cell['loss']:.3f} ({s['steps']} steps)")
    return cell


@task(name="scaling-fit", cache_key_fn=stage_cache_key("tasks"), **CACHED)
def fit_scaling_laws(points: list[dict], n_boot: int, level: float, seed: int, top_k: int,
                     require_interior: bool, window: int = 0) -> dict:
    """Approach 2, approach 3 and the extrapolation check over the finished runs (cached on their numbers)."""
    from tasks.scaling_fit import fit_study

    col = {k: [p[k] for p in points] for k in ("budget", "N", "D", "loss")}
    return fit_study(col["budget"], col["N"], col["D"], col["loss"], n_boot=n_boot, seed=seed, level=level,
                     top_k=top_k or None, require_interior=require_interior, window=window)


def _interval(x: dict, spec: str = ".3f") -> str:
    if x["low"] is None or not math.isfinite(x["low"]):
        return f"{x['estimate']:{spec}} (no interval)"
    return f"{x['estimate']:{spec}} [{x['low']:{spec}}, {x['high']:{spec}}]"


def fit_summary(fits: dict) -> str:
    parts = []
    f, p, e = fits["frontier"], fits["parametric"], fits["extrapolation"]
    parts.append(f"a {_interval(f['a'])}, b {_interval(f['b'])}" if "error" not in f else "frontier: no fit")
    parts.append(f"alpha {_interval(p['intervals']['alpha'])}, beta {_interval(p['intervals']['beta'])}"
                 if "error" not in p else "L(N, D): no fit")
    parts.append(f"extrapolation error {100 * e['relative_error']:+.1f}%" if "error" not in e else "no extrapolation")
    return "; ".join(parts)


def _log_fits(c, parent: str, fits: dict) -> None:
    from tasks.tracking import log_dict, log_metrics

    values = {}
    if "error" not in fits["frontier"]:
        for k in ("a", "b"):
            values |= {f"frontier/{k}": fits["frontier"][k]["estimate"], f"frontier/{k}_low": fits["frontier"][k]["low"],
                       f"frontier/{k}_high": fits["frontier"][k]["high"]}
    if "error" not in fits["parametric"]:
        for k, x in fits["parametric"]["intervals"].items():
            values |= {f"parametric/{k}": x["estimate"], f"parametric/{k}_low": x["low"], f"parametric/{k}_high": x["high"]}
    if "error" not in fits["extrapolation"]:
        values |= {f"extrapolation/{k}": fits["extrapolation"][k] for k in ("actual", "predicted", "relative_error")}
    log_metrics(c, parent, {k: v for k, v in values.items() if v is not None and math.isfinite(v)})
    log_dict(c, parent, fits, "fits.json")


# ---------------------------------------------------------------- plots

def _colors(keys) -> dict:
    return {k: reporting.COLORS[i % 10] for i, k in enumerate(keys)}


def _axes(ax, xlabel: str, ylabel: str, title: str, logx: bool = True, logy: bool = False, legend: bool = True) -> None:
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, which="both")
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def plot_loss_vs_flops(runs: list[dict], fits: dict, path: Path) -> Path:
    """Each size's training curves (faint) and final held-out losses against FLOPs, and the iso-FLOP minima."""
    from tasks.tracking import read_metric_rows

    plt = reporting._pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    ok = [r for r in runs if not r.get("error")]
    sizes = sorted({r["size"] for r in ok}, key=lambda s: next(r["N"] for r in ok if r["size"] == s))
    color = _colors(sizes)
    for size in sizes:
        mine = sorted((r for r in ok if r["size"] == size), key=lambda r: r["C"])
        for r in mine:
            pts = [(row["train/flops"], row["train/loss"]) for row in read_metric_rows(Path(r["metrics_file"]))
                   if "train/loss" in row and "train/flops" in row]
            if pts:
                ax.plot(*zip(*pts), color=color[size], alpha=0.25, lw=1)
        ax.plot([r["C"] for r in mine], [r["loss"] for r in mine], "o-", color=color[size], lw=2,
                label=f"{size} (N = {mine[0]['N']:,})")
    front = fits["frontier"]
    if "error" not in front:
        ms = front["minima"]
        ax.plot([m["budget"] for m in ms], [m["loss_opt"] for m in ms], "k*--", ms=14, lw=1.2,
                label=f"iso-FLOP minima (a = {front['a']['estimate']:.2f})")
    _axes(ax, "training FLOPs C", "loss (nats); lines: training loss, dots: final held-out loss",
          "loss against compute per model size, with the compute-optimal frontier")
    finals = [r["loss"] for r in ok]
    if finals:  # the first steps' losses (near log V) would squeeze the part that matters
        ax.set_ylim(min(finals) - 0.3, max(finals) + 0.8)
    return reporting._save(fig, path)


def plot_isoflop(runs: list[dict], fits: dict, path: Path) -> Path:
    """Loss against N per budget with the fitted parabolas and their minima; N_opt and D_opt against C."""
    import numpy as np

    from tasks.scaling_fit import around_best

    plt = reporting._pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ok = [r for r in runs if not r.get("error")]
    budgets = sorted({r["budget"] for r in ok})
    color = _colors(budgets)
    front = fits["frontier"]
    minima = {m["budget"]: m for m in front.get("minima", [])}
    ax = axes[0]
    for b in budgets:
        mine = sorted((r for r in ok if r["budget"] == b), key=lambda r: r["N"])
        ax.plot([r["N"] for r in mine], [r["loss"] for r in mine], "o", color=color[b], label=f"C = {budget_label(b)}")
        m = minima.get(b)
        if m:  # drawn over the sizes it was fitted to (scaling.isoflop_window), not extrapolated beyond them
            near = [mine[i] for i in around_best([r["N"] for r in mine], [r["loss"] for r in mine], fits.get("window", 0))]
            x = np.linspace(math.log(near[0]["N"]), math.log(near[-1]["N"]), 100)
            ax.plot(np.exp(x), m["loss_opt"] + m["curvature"] * (x - math.log(m["n_opt"])) ** 2, "-", color=color[b])
            if m["interior"]:  # a vertex beyond the sizes trained (require_interior off) would only stretch the axis
                ax.plot([m["n_opt"]], [m["loss_opt"]], "*", color=color[b], ms=14, mec="k")
    _axes(ax, "non-embedding parameters N", "final held-out loss (nats)", "iso-FLOP curves: parabolas in log N, * = minimum")
    for ax, key, label in ((axes[1], "n_opt", "N_opt"), (axes[2], "d_opt", "D_opt")):
        if "error" in front:
            _axes(ax, "training FLOPs C", label, f"{label}: no fit", logy=True)
            continue
        cs = np.array([m["budget"] for m in front["minima"]])
        ax.plot(cs, [m[key] for m in front["minima"]], "k*", ms=12)
        law = front[key]
        grid = np.geomspace(cs.min() / 1.5, cs.max() * 1.5, 50)
        exp = front["a" if key == "n_opt" else "b"]
        ax.plot(grid, law["k"] * grid ** law["exponent"], "-", color="#d62728",
                label=f"{label} ~ C^{_interval(exp, '.2f')}")
        _axes(ax, "training FLOPs C", label, f"{label} against compute (approach 2)", logy=True)
    return reporting._save(fig, path)


def plot_parametric(runs: list[dict], fits: dict, path: Path) -> Path:
    """The fitted L(N, D) against the observed losses, and the held-out run's prediction from the others."""
    plt = reporting._pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ok = [r for r in runs if not r.get("error")]
    par, ext = fits["parametric"], fits["extrapolation"]
    budgets = sorted({r["budget"] for r in ok})
    color = _colors(budgets)
    if "error" in par:
        for ax in axes:
            ax.set_title(f"L(N, D): no fit ({par['error'][:60]})", fontsize=9)
        return reporting._save(fig, path)
    pred = par["predicted"]
    ax = axes[0]
    ax.scatter([r["loss"] for r in ok], pred, c=[color[r["budget"]] for r in ok], s=30, zorder=3)
    if "error" not in ext:
        low, high = (ext["interval"] or {}).get("low"), (ext["interval"] or {}).get("high")
        err = [[ext["predicted"] - low], [high - ext["predicted"]]] if low is not None and math.isfinite(low) else None
        ax.errorbar([ext["actual"]], [ext["predicted"]], yerr=err, fmt="*", color="#d62728", ms=16, capsize=4,
                    label=f"held-out run, predicted by the others ({100 * ext['relative_error']:+.2f}%)", zorder=4)
    lo, hi = min([r["loss"] for r in ok] + pred), max([r["loss"] for r in ok] + pred)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    q = par["fit"]
    _axes(ax, "observed held-out loss", "L(N, D) fitted on every run",
          f"L = {q['E']:.3g} + {q['A']:.3g}/N^{q['alpha']:.2f} + {q['B']:.3g}/D^{q['beta']:.2f}", logx=False)
    ax = axes[1]
    for b in budgets:
        mine = sorted(((r, p) for r, p in zip(ok, pred) if r["budget"] == b), key=lambda x: x[0]["N"])
        ax.plot([r["N"] for r, _ in mine], [r["loss"] for r, _ in mine], "o", color=color[b], label=f"C = {budget_label(b)}")
        ax.plot([r["N"] for r, _ in mine], [p for _, p in mine], "-", color=color[b])
    _axes(ax, "non-embedding parameters N", "held-out loss: dots observed, lines L(N, D)",
          "the fitted surface along each budget's runs")
    return reporting._save(fig, path)


# ---------------------------------------------------------------- report

def report_markdown(sc: ScalingConfig, runs: list[dict], models: dict, fits: dict, context: dict) -> str:
    exp_id = context["experiment_id"]
    ok = [r for r in runs if not r.get("error")]
    by_n = sorted(models, key=lambda k: models[k]["N"])
    span = models[by_n[-1]]["N"] / max(1, models[by_n[0]]["N"])
    budgets = sorted(sc.budgets)
    lines = ["# Scaling laws", "",
             f"{len(sc.sizes)} model sizes (non-embedding N from {models[by_n[0]]['N']:,} to {models[by_n[-1]]['N']:,}: "
             f"{span:.0f}x) x {len(budgets)} compute budgets ({', '.join(budget_label(b) for b in budgets)} FLOPs), "
             f"objective `{sc.objective}`; {len(ok)} of {len(runs)} runs finished. Every run's learning rate warms up "
             f"over its first {sc.warmup_frac:.0%} of steps and decays by cosine to its own last step. Corpus: snapshot "
             f"`{context['snapshot_id']}`, {context['n_documents']:,} documents, {context['train_tokens']:,} training "
             f"tokens (vocabulary {context['vocab_size']:,}); every final model is scored on the same "
             f"{context['eval_rows']:,} held-out rows.", "",
             "## Sizes", "",
             "| size | layers | d_model | heads | d_ff | N (non-embedding) | all parameters | FLOPs per token | 6N / FLOPs per token |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in by_n:
        m = models[k]
        mc = m["config"] if isinstance(m["config"], dict) else to_dict(m["config"])
        lines.append(f"| {k} | {mc['n_layers']} | {mc['d_model']} | {mc['n_heads']} | {mc['d_ff']} | {m['N']:,} | "
                     f"{m['params']:,} | {m['flops_per_token']:.3g} | {6 * m['N'] / m['flops_per_token']:.2f} |")
    lines += ["", "## Runs", "",
              "| run | N | budget | steps (warmup) | D tokens | epochs | C FLOPs | held-out loss | status | MLflow run |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in sorted(runs, key=lambda r: (r["budget"], r["N"])):
        if r.get("error"):
            lines.append(f"| {r['name']} | {r['N']:,} | {budget_label(r['budget'])} | - | - | - | - | - | failed: "
                         f"{reporting._one_line(r['error'])} | {reporting.run_link(exp_id, r['run_id'])} |")
        else:
            lines.append(f"| {r['name']} | {r['N']:,} | {budget_label(r['budget'])} | {r['steps']} ({r['warmup_steps']}) | "
                         f"{r['D']:,.0f} | {r['epochs']:.2f} | {r['C']:.3g} | {r['loss']:.4f} | ok | "
                         f"{reporting.run_link(exp_id, r['run_id'])} |")
    k = flops_elasticity(models)
    lines += _frontier_lines(fits, k) + _parametric_lines(fits) + _extrapolation_lines(fits)
    lines += _limits_lines(sc, ok, models, context, span, k)
    lines += ["", f"Prefect flow run `{context['flow_run_name']}` ({context['flow_run_id']}); MLflow experiment "
                  f"`{context['experiment']}` ({exp_id}), parent run {reporting.run_link(exp_id, context['parent_run_id'])}."]
    return "\n".join(lines) + "\n"


def flops_elasticity(models: dict) -> float:
    """k in FLOPs per token ~ N^k across the sizes: 1 where 6N is all of the compute, less where the output
    layer and the attention scores, which grow with width only, weigh in."""
    import numpy as np

    n = np.log([m["N"] for m in models.values()])
    return float(np.polyfit(n, np.log([m["flops_per_token"] for m in models.values()]), 1)[0]) if len(n) > 1 else 1.0


def _frontier_lines(fits: dict, k: float) -> list[str]:
    f = fits["frontier"]
    level = f"{fits['level']:.0%}"
    lines = ["", "## Compute-optimal frontier (Hoffmann et al. 2022, approach 2)", "",
             "Per budget, a parabola in log N through the final losses"
             + (f" of the {fits['window']} sizes around its best run" if fits.get("window") else "")
             + "; its minimum is that budget's compute-optimal N (D read off the budget's runs at that N). "
             "N_opt ~ C^a and D_opt ~ C^b are fitted through the minima; "
             f"intervals: {level} percentile bootstrap, {fits['n_boot']} replicates, each budget's runs resampled.", ""]
    if "error" in f:
        return lines + [f"**No frontier**: {f['error']}"]
    lines += ["| budget | N_opt | D_opt | loss at the minimum | runs |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {budget_label(m['budget'])} | {m['n_opt']:,.0f} | {m['d_opt']:,.0f} | {m['loss_opt']:.4f} | {m['n_runs']} |"
              for m in f["minima"]]
    lines += [f"| {budget_label(s['budget'])} | not used: {s['reason'].split(': ', 1)[-1]} | | | |" for s in f["skipped"]]
    h = HOFFMANN["approach 2"]
    lines += ["", f"| exponent | this study ({level} interval) | Hoffmann et al. 2022, approach 2 | Kaplan et al. 2020 |",
              "|---|---:|---:|---:|",
              f"| a in N_opt ~ C^a | **{_interval(f['a'])}** | {h['a'][0]} [{h['a'][1]}, {h['a'][2]}] | {KAPLAN['a']} |",
              f"| b in D_opt ~ C^b | **{_interval(f['b'])}** | {h['b'][0]} [{h['b'][1]}, {h['b'][2]}] | {KAPLAN['b']} |"]
    lines += ["", f"Here the FLOPs per token grow as N^{k:.2f} across the sizes, not as N (6N is not all of the "
                  f"compute, next section), so a budget spent at N_opt ~ C^a leaves D_opt ~ C^(1 - {k:.2f} a): "
                  f"a k + b = {f['a']['estimate'] * k + f['b']['estimate']:.2f} here, where 1 is what the FLOP "
                  "accounting requires (the rest is the parabolas' error in D). Under C = 6ND (k = 1) the published "
                  "a + b = 1; with k < 1 a larger a is expected for the same trade-off, so a is not comparable "
                  "with theirs as it stands."]
    if len(f["minima"]) == 2:
        lines += ["", "Two minima make the exponents a line through two points: the interval is the only guide to "
                      "how much they mean."]
    return lines


def _parametric_lines(fits: dict) -> list[str]:
    p = fits["parametric"]
    lines = ["", "## L(N, D) = E + A / N^alpha + B / D^beta (approach 3)", "",
             "Fitted on every run by minimising a Huber loss (delta 1e-3) on log-loss, L-BFGS-B from a grid of starts "
             f"(the best optimum kept); intervals: {fits['level']:.0%} percentile bootstrap over the runs. "
             "a = beta / (alpha + beta) and b = alpha / (alpha + beta) are the exponents it implies if C = 6ND.", ""]
    if "error" in p:
        return lines + [f"**No fit**: {p['error']}"]
    h = HOFFMANN["approach 3"]
    iv = p["intervals"]
    lines += ["| parameter | this study | Hoffmann et al. 2022, approach 3 |", "|---|---:|---:|"]
    lines += [f"| {k} | **{_interval(iv[k])}** | {h[k]} |" for k in ("alpha", "beta", "a", "b")]
    lines += [f"| {k} | {_interval(iv[k], '.4g')} | {h[k]} |" for k in ("E", "A", "B")]
    if p["fit"]["at_bound"]:
        lines += ["", f"At a bound of the search: {', '.join(p['fit']['at_bound'])}: the runs do not determine it."]
    return lines


def _extrapolation_lines(fits: dict) -> list[str]:
    e = fits["extrapolation"]
    lines = ["", "## Extrapolation check", ""]
    if "error" in e:
        return lines + [f"**Not made**: {e['error']}"]
    iv = e.get("interval") or {}
    band = (f" ({fits['level']:.0%} bootstrap interval of the prediction [{iv['low']:.4f}, {iv['high']:.4f}])"
            if iv.get("low") is not None and math.isfinite(iv["low"]) else "")
    return lines + [f"The largest run (N = {e['n']:,.0f} at the largest budget, {budget_label(e['budget'])} FLOPs, "
                    f"D = {e['d']:,.0f}) was held out; L(N, D) fitted on the other {fits['n_runs'] - 1} runs predicts "
                    f"**{e['predicted']:.4f}**{band} where it reached **{e['actual']:.4f}**: a prediction error of "
                    f"**{100 * e['relative_error']:+.2f}%** of the loss."]


def _limits_lines(sc: ScalingConfig, ok: list[dict], models: dict, context: dict, span: float, k: float) -> list[str]:
    share = [6 * m["N"] / m["flops_per_token"] for m in models.values()]
    epochs = max((r["epochs"] for r in ok), default=0.0)
    return ["", "## What these runs can and cannot show", "",
            f"- **Scale.** N spans {span:.0f}x here and the largest model has {max(m['N'] for m in models.values()):,} "
            "non-embedding parameters; Hoffmann et al. fitted 70M to 16B, Kaplan et al. 768 to 1.5B. Exponents "
            "measured this far below either are not estimates of theirs, and nothing says the law holds from here "
            "to there.",
            f"- **FLOPs are not 6ND.** At these widths the output layer over the vocabulary and the attention scores "
            f"are a large part of the compute: 6N is {min(share):.0%} to {max(share):.0%} of the FLOPs per token, "
            f"which grow as N^{k:.2f}. C is the trainer's full count, so approach 2's a and b are exponents in real "
            "compute; approach 3's implied a and b assume C = 6ND and are not comparable with them here.",
            f"- **Repeated data.** The corpus has {context['train_tokens']:,} training tokens; the longest run saw "
            f"it {epochs:.1f} times. D counts repeated tokens, which are worth less than fresh ones (Muennighoff et "
            "al. 2023), so the small models at the large budgets look worse than on fresh data and the optimum "
            "shifts towards larger N.",
            "- **One seed, one learning rate.** Each cell is one run; the run-to-run noise is of the order of the "
            "differences between neighbouring sizes near a minimum, and the learning rate was not tuned per size. "
            "The bootstrap intervals resample these runs: they show how much the fit depends on which runs it "
            "sees, not the seed-to-seed spread nor the choices above.",
            f"- **Range of compute.** {len(sc.budgets)} budgets over {max(sc.budgets) / min(sc.budgets):.0f}x: a "
            "frontier exponent from so few minima over so short a range moves with every run.",
            "- **What it does show**: the whole method on real runs (per-budget schedules, iso-FLOP minima, both "
            "fits with intervals, a held-out prediction), whether these budgets have an interior optimum and which "
            "way it moves as compute grows, and how well L(N, D) interpolates within the grid. Run "
            "`configs/studies/scaling-gpu.yaml` on a GPU for larger models and budgets."]


def write_report(sc, ws, c, parent, runs, models, fits, context) -> dict:
    out = ws.stage_dir("reports", parent)
    out.mkdir(parents=True, exist_ok=True)
    markdown = report_markdown(sc, runs, models, fits, context)
    images = [plot_loss_vs_flops(runs, fits, out / "loss_vs_flops.png"), plot_isoflop(runs, fits, out / "isoflop.png"),
              plot_parametric(runs, fits, out / "parametric_fit.png")]
    md_path = out / "report.md"
    md_path.write_text(markdown + "".join(f"\n![{p.stem}]({p.name})\n" for p in images))
    html = reporting.write_html(markdown, images, out / "report.html", "scaling laws")
    columns = ["name", "size", "budget", "N", "D", "C", "loss", "steps", "warmup_steps", "epochs", "run_id", "error"]
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(runs)
    (out / "fits.json").write_text(json.dumps(fits, indent=2))
    c.log_artifacts(parent, str(out))
    # The Prefect UI shows the plots from the MLflow server that `pretrain ui` starts beside it.
    urls = {p: f"{reporting.MLFLOW_UI}/get-artifact?path={p.name}&run_uuid={parent}" for p in images}
    create_markdown_artifact(markdown=markdown + "".join(f"\n![{p.stem}]({u})\n" for p, u in urls.items()),
                             key="scaling-report", description="scaling laws: runs, fits, extrapolation check")
    for p, url in urls.items():
        create_image_artifact(image_url=url, key=f"scaling-{p.stem.replace('_', '-')}", description=f"scaling laws: {p.stem}")
    return {"markdown": markdown, "markdown_path": str(md_path), "html_path": str(html),
            "plots": [str(p) for p in images]}
