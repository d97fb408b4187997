"""The comparison report: a markdown table and plots, logged to MLflow and as a Prefect artefact."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from tasks.tracking import read_metric_rows  # noqa: E402

MLFLOW_UI = "http://127.0.0.1:5000"


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (nan for a single seed)."""
    a = np.asarray(values, dtype=float)
    if len(a) < 2:
        return float(a.mean()), float("nan")
    return float(a.mean()), float(stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a)))


def fmt(mean: float, half: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def downstream_summary(runs: list[dict], split: str = "test") -> dict[str, tuple[float, float]]:
    keys = runs[0]["scores"][split].keys() if runs else []
    return {k: mean_ci([r["scores"][split][k] for r in runs]) for k in keys}


def run_link(exp_id: str, run_id: str) -> str:
    return f"[{run_id[:8]}]({MLFLOW_UI}/#/experiments/{exp_id}/runs/{run_id})"


# The validation statistic that says most about each objective, in order of preference.
OBJECTIVE_METRICS = (("val/masked_accuracy", "masked acc"), ("val/disc_accuracy", "replaced-token acc"),
                     ("val/token_accuracy", "target acc"), ("val/next_token_accuracy", "next-token acc"),
                     ("val/sentence_accuracy", "sentence acc"))


def objective_metric(summary: dict) -> str:
    parts = [f"{label} {summary[key]:.3f}" for key, label in OBJECTIVE_METRICS if key in summary]
    return ", ".join(parts) or "-"


def build_markdown(variants: list[dict], context: dict) -> str:
    task = context.get("task")
    lines = [
        f"# Pretraining comparison: {', '.join(v['name'] for v in variants if v.get('objective'))}",
        "",
        f"Snapshot `{context['snapshot_id']}` ({context['n_documents']:,} documents, "
        f"{context['train_tokens']:,} training tokens), tokenizer {context['tokenizer']}, "
        f"model size `{context['model_size']}`.",
        "",
    ]
    header = "| variant | objective | params | tokens seen | pretrain FLOPs | val loss | val metric |"
    sep = "|---|---|---:|---:|---:|---:|---:|"
    if task:
        header += " test accuracy | test macro-F1 | test MCC |"
        sep += "---:|---:|---:|"
    lines += [header + " MLflow run |", sep + "---|"]
    for v in variants:
        s = v.get("summary", {})
        metric = objective_metric(s)
        row = (f"| {v['name']} | {v.get('objective') or '-'} | {s.get('n_params', v.get('n_params', 0)) / 1e6:.2f}M | "
               f"{s.get('tokens_seen', 0):,} | {s.get('pretrain_flops', 0):.2e} | "
               f"{s['val/loss']:.3f} | {metric} |" if s else
               f"| {v['name']} | - | {v.get('n_params', 0) / 1e6:.2f}M | 0 | 0 | - | - |")
        if task:
            d = downstream_summary(v["downstream"])
            row += f" {fmt(*d['accuracy'])} | {fmt(*d['macro_f1'])} | {fmt(*d['mcc'])} |"
        lines.append(row + f" {run_link(context['experiment_id'], v['run_id'])} |")
    lines.append("")
    if task:
        n_seeds = len(variants[0]["downstream"])
        lines += [
            f"Downstream task `{task['name']}`: {len(task['labels'])} classes ({', '.join(task['labels'])}); "
            f"{task['counts'].get('train', 0)} / {task['counts'].get('validation', 0)} / {task['counts'].get('test', 0)} "
            "train / validation / test documents, none of them in the pretraining snapshot. "
            + (f"Scores are the mean ± 95% t-interval over {n_seeds} fine-tuning seeds."
               if n_seeds > 1 else "One fine-tuning seed: no interval, so small differences are not evidence."),
            "",
        ]
        floor = next((v for v in variants if not v.get("objective")), None)
        if floor:
            f_acc = downstream_summary(floor["downstream"])["accuracy"]
            for v in variants:
                if v is floor:
                    continue
                acc = downstream_summary(v["downstream"])["accuracy"]
                delta = acc[0] - f_acc[0]
                overlap = not (math.isnan(acc[1]) or math.isnan(f_acc[1])) and abs(delta) <= acc[1] + f_acc[1]
                verdict = "is above" if delta > 0 else "is not above"
                note = " (the intervals overlap: not a significant difference)" if overlap else ""
                lines.append(f"- `{v['name']}` {verdict} the random-init floor: {delta:+.3f} test accuracy{note}.")
            lines.append("")
    lines += [
        "Validation losses of different objectives measure different things (masked-token vs next-token "
        "prediction) and are not comparable across objectives; the downstream scores are.",
        "",
        f"Prefect flow run `{context.get('flow_run_name', '')}` ({context.get('flow_run_id', '')}); "
        f"MLflow experiment `{context['experiment']}` ({context['experiment_id']}), parent run "
        f"{run_link(context['experiment_id'], context['parent_run_id'])}.",
    ]
    return "\n".join(lines) + "\n"


def plot_losses(variants: list[dict], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for v in variants:
        if not v.get("metrics_file"):
            continue
        rows = read_metric_rows(Path(v["metrics_file"]))
        flops_per_step = v["summary"]["pretrain_flops"] / max(r["step"] for r in rows)
        for ax, key in zip(axes, ("train/loss", "val/loss")):
            pts = [(r["step"] * flops_per_step, r[key]) for r in rows if key in r]
            ax.plot(*zip(*pts), marker="o" if key == "val/loss" else None, label=v["name"])
    for ax, title in zip(axes, ("training loss", "validation loss")):
        ax.set_xlabel("training FLOPs")
        ax.set_xscale("log")
        ax.set_ylabel("cross-entropy (nats)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_downstream(variants: list[dict], task_name: str, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [v["name"] for v in variants]
    for ax, metric in zip(axes, ("accuracy", "macro_f1")):
        means, halves = zip(*(downstream_summary(v["downstream"])[metric] for v in variants))
        ax.bar(names, means, yerr=[0 if math.isnan(h) else h for h in halves], capsize=6,
               color=["#4c72b0", "#dd8452", "#8c8c8c", "#55a868", "#c44e52"][: len(names)])
        ax.set_title(f"{task_name}: test {metric}")
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes:
        ax.tick_params(axis="x", rotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
