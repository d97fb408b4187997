"""The fine-tuning matrix of a study: every variant x method x seed is a cell, run as a Prefect task.

Cells are independent, so they run `study.max_parallel` at a time on a thread pool (torch releases
the GIL in its kernels; the CPU threads are shared out between the cells). A cell that fails is
recorded with its error and the others go on. Each cell is an MLflow run nested under its variant's
run, with the same keys everywhere (objective, model_size, method, seed; test/accuracy ...), so
MLflow's "compare runs" view lines them up.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from prefect.task_runners import ThreadPoolTaskRunner

from model.checkpoint import MARKER, sha256_file
from tasks import report as reporting
from tasks.evaluation import finetune_downstream
from tasks.tracking import log_metric_rows, log_metrics, log_params, start_run


def cell_inputs(v: dict) -> dict:
    """What a cell fine-tunes: the variant's checkpoint (keyed by its checksums), or a random model."""
    if v.get("objective"):
        return {"checkpoint": v["checkpoint"], "checkpoint_digest": sha256_file(Path(v["checkpoint"]) / MARKER)}
    return {"random_model": v["model_config"]}


def run_cells(variants: list[dict], methods: dict, seeds: list[int], common: dict, max_parallel: int,
              on_done) -> list[dict]:
    """Fine-tune every (variant, method, seed); returns the cells in submission order.

    `common` holds the task inputs shared by all cells (warehouse, task, tokenizer, specials);
    `on_done(cell, cached)` is called as each cell finishes, in order.
    """
    threads = max(1, (os.cpu_count() or 1) // max_parallel) if max_parallel > 1 else 0
    pending = []
    with ThreadPoolTaskRunner(max_workers=max_parallel) as runner:
        for v in variants:
            if v.get("error"):
                for name in methods:
                    for seed in seeds:
                        pending.append(({"variant": v["name"], "method": name, "seed": seed,
                                         "error": f"pretraining failed: {v['error']}"}, None))
                continue
            weights = cell_inputs(v)
            for name, ft in methods.items():
                for lr in ft.lr_grid or [ft.lr]:
                    label = f"{v['name']}/{name}" + (f"/lr{lr:g}" if ft.lr_grid else "")
                    for seed in seeds:
                        params = {**common, **weights,
                                  "finetune_config": asdict(replace(ft, lr=lr, lr_grid=[])),
                                  "seed": seed, "variant": label, "num_threads": threads}
                        future = runner.submit(finetune_downstream, parameters=params)
                        pending.append(({"variant": v["name"], "method": name, "seed": seed, "lr": lr,
                                         "grid": len(ft.lr_grid)}, future))
        cells = []
        for cell, future in pending:
            cached = False
            if future is not None:
                future.wait()
                state = future.state
                cached = state.name == "Cached"
                if state.is_completed():
                    cell.update(future.result())
                else:
                    err = state.result(raise_on_failure=False)
                    cell["error"] = f"{type(err).__name__}: {err}" if isinstance(err, BaseException) else str(state.message)
            on_done(cell, cached)
            cells.append(cell)
    select_learning_rates(cells)
    return cells


def select_learning_rates(cells: list[dict]) -> None:
    """Per (variant, method), mark the cells of the learning rate with the best mean validation
    accuracy over seeds as `selected`; the report's test scores use those only."""
    groups: dict[tuple, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for cell in cells:
        groups[(cell["variant"], cell["method"])][cell.get("lr", 0.0)].append(cell)
    for by_lr in groups.values():
        def val_accuracy(lr: float) -> float:
            ok = [c["scores"]["validation"]["accuracy"] for c in by_lr[lr] if not c.get("error")]
            return float(np.mean(ok)) if ok else -1.0
        best = max(sorted(by_lr), key=val_accuracy)  # ties go to the smallest rate
        for lr, group in by_lr.items():
            for cell in group:
                cell["selected"] = lr == best


def log_cell(c, exp_id: str, v: dict, cell: dict, task_name: str, tags: dict) -> None:
    """One MLflow run per cell, nested under its variant's run."""
    lr = f"/lr{cell['lr']:g}" if cell.get("grid") else ""
    run_id = start_run(c, exp_id, f"{v['name']}/{cell['method']}{lr}/s{cell['seed']}", parent=v["run_id"], tags=tags)
    cell["run_id"] = run_id
    log_params(c, run_id, {"objective": v.get("objective") or "none", "model_size": v["size"], "variant": v["name"],
                           "method": cell["method"], "seed": cell["seed"], "finetune_lr": cell.get("lr"),
                           "task": task_name, "snapshot_id": tags.get("snapshot_id", ""), **cell.get("info", {})})
    if cell.get("error"):
        c.set_tag(run_id, "error", cell["error"][:5000])
        c.set_terminated(run_id, "FAILED")
        return
    values = {f"{split}/{k}": val for split, scores in cell["scores"].items() for k, val in scores.items()}
    values.update({k: val for k, val in (v.get("summary") or {}).items()
                   if k.startswith("val/") and isinstance(val, (int, float))})  # the pretraining metrics, for comparison
    log_metric_rows(c, run_id, [{"step": 0, **values}] + [
        {"step": p["epoch"], "finetune/val_accuracy": p["val_accuracy"], "finetune/train_loss": p["train_loss"]}
        for p in cell["curve"]])
    c.set_terminated(run_id, "FINISHED")


def log_variant_summary(c, v: dict, cells: list[dict], methods: list[str], task_name: str) -> None:
    """Mean and 95% interval over seeds on the variant's run: downstream/<task>/<method>/<metric>[_ci95],
    and downstream/<task>/<metric>[_ci95] for the first method."""
    for cell in cells:  # tagged once every cell is done: selection needs all the rates
        if cell["variant"] == v["name"] and cell.get("grid") and cell.get("run_id"):
            c.set_tag(cell["run_id"], "lr_selected", str(cell.get("selected", False)).lower())
    values = {}
    for i, method in enumerate(methods):
        chosen = reporting.chosen_lr(cells, v["name"], method)
        if chosen is not None:
            values[f"downstream/{task_name}/{method}/lr"] = chosen
        for metric, (mean, half) in reporting.cell_summary(cells, v["name"], method).items():
            # The first method's scores also go under the method-free keys every pipeline run has.
            for key in [f"downstream/{task_name}/{method}/{metric}"] + ([f"downstream/{task_name}/{metric}"] if i == 0 else []):
                if mean == mean:
                    values[key] = mean
                if half == half:
                    values[f"{key}_ci95"] = half
    log_metrics(c, v["run_id"], values)
