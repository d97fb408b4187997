"""The comparison report: markdown tables, PNG plots and a self-contained HTML page.

Inputs are plain dicts: `variants` (one per pretrained model and the random-init floors: name,
objective, size, run_id, summary, metrics_file, error) and `cells` (one per variant x fine-tuning
method x seed: variant, method, seed, scores, curve, info, run_id, error).
"""
from __future__ import annotations

import base64
import math
from pathlib import Path

import numpy as np

from tasks.statistics import intervals_overlap, mean_ci, pairwise, ranking
from tasks.tracking import read_metric_rows

MLFLOW_UI = "http://127.0.0.1:5000"
METRICS = ("accuracy", "macro_f1", "mcc")
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def _pyplot():
    """matplotlib on first use: a run whose plots come from cache never imports it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fmt(mean: float, half: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def ok_cells(cells: list[dict], variant: str, method: str) -> list[dict]:
    """The finished cells of (variant, method) at the selected learning rate."""
    return [c for c in cells if c["variant"] == variant and c["method"] == method and not c.get("error")
            and c.get("selected", True)]


def chosen_lr(cells: list[dict], variant: str, method: str) -> float | None:
    return next((c["lr"] for c in ok_cells(cells, variant, method) if "lr" in c), None)


def cell_summary(cells: list[dict], variant: str, method: str, split: str = "test") -> dict[str, tuple[float, float]]:
    runs = ok_cells(cells, variant, method)
    return {k: mean_ci([r["scores"][split][k] for r in runs]) for k in METRICS}


def seed_scores(cells: list[dict], variant: str, method: str, metric: str = "accuracy") -> dict[int, float]:
    return {c["seed"]: c["scores"]["test"][metric] for c in ok_cells(cells, variant, method)}


def run_link(exp_id: str, run_id: str) -> str:
    return f"[{run_id[:8]}]({MLFLOW_UI}/#/experiments/{exp_id}/runs/{run_id})" if run_id else "-"


# The validation statistic that says most about each objective, in order of preference.
OBJECTIVE_METRICS = (("val/masked_accuracy", "masked acc"), ("val/disc_accuracy", "replaced-token acc"),
                     ("val/token_accuracy", "target acc"), ("val/next_token_accuracy", "next-token acc"),
                     ("val/sentence_accuracy", "sentence acc"), ("val/perplexity", "perplexity"))


def objective_metric(summary: dict) -> str:
    parts = [f"{label} {summary[key]:.3f}" for key, label in OBJECTIVE_METRICS if key in summary]
    return ", ".join(parts) or "-"


def _one_line(error: str) -> str:
    return error.strip().splitlines()[-1].replace("|", "/")[:160] if error else ""


def pretraining_table(variants: list[dict], exp_id: str) -> list[str]:
    lines = ["| variant | objective | size | params | tokens seen | pretrain FLOPs | val loss | val metric | status | MLflow run |",
             "|---|---|---|---:|---:|---:|---:|---|---|---|"]
    for v in variants:
        s = v.get("summary") or {}
        status = f"failed: {_one_line(v['error'])}" if v.get("error") else "ok"
        params = s.get("n_params", v.get("n_params", 0)) / 1e6
        if s:
            lines.append(f"| {v['name']} | {v['objective']} | {v['size']} | {params:.2f}M | {s.get('tokens_seen', 0):,} | "
                         f"{s.get('pretrain_flops', 0):.2e} | {s['val/loss']:.3f} | {objective_metric(s)} | {status} | "
                         f"{run_link(exp_id, v['run_id'])} |")
        else:
            lines.append(f"| {v['name']} | {v.get('objective') or '-'} | {v['size']} | {params:.2f}M | 0 | 0 | - | - | "
                         f"{status} | {run_link(exp_id, v['run_id'])} |")
    return lines


def downstream_table(variants: list[dict], cells: list[dict], methods: list[str]) -> list[str]:
    lines = ["| variant | method | lr | seeds | test accuracy | test macro-F1 | test MCC | val accuracy | trained params | status |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for method in methods:
        for v in variants:
            lr = chosen_lr(cells, v["name"], method)
            tried = sorted({c.get("lr") for c in cells if c["variant"] == v["name"] and c["method"] == method})
            lr_text = "-" if lr is None else f"{lr:g}" + (f" (best of {len(tried)})" if len(tried) > 1 else "")
            mine = [c for c in cells if c["variant"] == v["name"] and c["method"] == method and c.get("selected", True)]
            if not mine:
                continue
            ok = [c for c in mine if not c.get("error")]
            failed = [c for c in mine if c.get("error")]
            t, val = cell_summary(cells, v["name"], method), cell_summary(cells, v["name"], method, "validation")
            trained = ok[0]["info"].get("trainable_params", 0) if ok else 0
            status = "ok" if not failed else f"{len(failed)} failed: {_one_line(failed[0]['error'])}"
            lines.append(f"| {v['name']} | {method} | {lr_text} | {len(ok)}/{len(mine)} | {fmt(*t['accuracy'])} | {fmt(*t['macro_f1'])} | "
                         f"{fmt(*t['mcc'])} | {fmt(*val['accuracy'])} | {trained:,} | {status} |")
    return lines


def comparisons(variants: list[dict], cells: list[dict], method: str, alpha: float) -> tuple[list[str], list[dict]]:
    """The ranking by test accuracy for one method, with ties spelled out, and the pairwise tests."""
    names = [v["name"] for v in variants if ok_cells(cells, v["name"], method)]
    scores = {n: seed_scores(cells, n, method) for n in names}
    tests = pairwise(scores, alpha)
    means = {n: cell_summary(cells, n, method)["accuracy"] for n in names}
    lines = [f"**{method}**: ranked by mean test accuracy; a variant is ahead of another only if the paired "
             f"t-test over seeds is significant (Holm-corrected, alpha {alpha}) and the 95% intervals do not overlap.",
             "", "| rank | variant | test accuracy | not separable from |", "|---:|---|---:|---|"]
    for r in ranking(means, tests):
        lines.append(f"| {r['rank']} | {r['variant']} | {fmt(r['mean'], r['ci95'])} | {', '.join(r['ties']) or '-'} |")
    rows = [{"method": method, "a": t.a, "b": t.b, "diff_accuracy": t.diff, "p_value": t.p_value,
             "p_holm": t.p_adjusted, "n_seeds": t.n, "significant": t.significant,
             "intervals_overlap": intervals_overlap(means[t.a], means[t.b])} for t in tests]
    floors = [n for n in names if any(v["name"] == n and not v.get("objective") for v in variants)]
    verdicts = []
    for row in rows:
        if not ({row["a"], row["b"]} & set(floors)) or {row["a"], row["b"]} <= set(floors):
            continue
        sign = 1 if row["b"] in floors else -1
        other, floor = (row["a"], row["b"]) if sign == 1 else (row["b"], row["a"])
        delta = sign * row["diff_accuracy"]
        p_text = f"p = {row['p_value']:.3g}, Holm-adjusted {row['p_holm']:.3g}"
        if row["significant"] and not row["intervals_overlap"]:
            verdict = "above" if delta > 0 else "below"
            verdicts.append(f"- `{other}` is {verdict} `{floor}`: {delta:+.3f} test accuracy ({p_text}).")
        else:
            why = ("untested: fewer than 2 paired seeds, or identical differences" if math.isnan(row["p_value"]) else
                   p_text + (", intervals overlap" if row["intervals_overlap"] else ""))
            verdicts.append(f"- `{other}` vs `{floor}`: {delta:+.3f} test accuracy, not a significant difference ({why}).")
    if rows:
        verdicts.append(f"- Holm's correction runs over all {len(rows)} pairs of this method; with "
                        f"{max(r['n_seeds'] for r in rows)} seeds a raw p under {alpha} is often not enough.")
    return lines + [""] + verdicts, rows


def contamination_lines(contamination: dict, threshold: float) -> list[str]:
    if not contamination:
        return []
    lines = ["**Contamination** (word n-gram overlap of each evaluation split with the pretraining snapshot):", "",
             "| split | examples | n | mean overlap | contaminated examples |", "|---|---:|---:|---:|---:|"]
    warn = []
    for split, c in contamination.items():
        lines.append(f"| {split} | {c['n_examples']} | {c['n']} | {c['mean_overlap']:.3f} | "
                     f"{c['contaminated']} ({c['contaminated_frac']:.1%}) |")
        if c["contaminated_frac"] > threshold:
            warn.append(split)
    if warn:
        lines += ["", f"WARNING: more than {threshold:.0%} of the {', '.join(warn)} examples overlap the pretraining "
                      "data; their scores may measure memorisation."]
    return lines + [""]


def build_markdown(variants: list[dict], cells: list[dict], methods: list[str], context: dict) -> tuple[str, list[dict]]:
    """The report and the full pairwise-test table (for a CSV artefact)."""
    task, exp_id = context.get("task"), context["experiment_id"]
    pretrained = [v["name"] for v in variants if v.get("objective")]
    lines = [f"# Pretraining comparison: {', '.join(pretrained)}", "",
             f"Snapshot `{context['snapshot_id']}` ({context['n_documents']:,} documents, "
             f"{context['train_tokens']:,} training tokens), tokenizer {context['tokenizer']}, "
             f"model sizes {', '.join(f'`{s}`' for s in context['sizes'])}.", "", "## Pretraining", ""]
    lines += pretraining_table(variants, exp_id)
    lines += ["", "Validation losses of different objectives measure different things (masked-token vs next-token "
                  "prediction) and are not comparable across objectives; the downstream scores are.", ""]
    all_rows: list[dict] = []
    if task:
        seeds = sorted({c["seed"] for c in cells})
        lines += ["## Downstream", "",
                  f"Task `{task['name']}`: {len(task['labels'])} classes; {task['counts'].get('train', 0)} / "
                  f"{task['counts'].get('validation', 0)} / {task['counts'].get('test', 0)} train / validation / test "
                  "examples, none of them in the pretraining snapshot. "
                  + (f"Scores are the mean ± 95% t-interval over {len(seeds)} fine-tuning seeds ({', '.join(map(str, seeds))})."
                     if len(seeds) > 1 else "One fine-tuning seed: no interval, so small differences are not evidence."), ""]
        lines += downstream_table(variants, cells, methods) + [""]
        lines += contamination_lines(context.get("contamination") or {}, context.get("contamination_threshold", 0.1))
        for method in methods:
            block, rows = comparisons(variants, cells, method, context.get("alpha", 0.05))
            lines += block + [""]
            all_rows += rows
    lines += [f"Prefect flow run `{context.get('flow_run_name', '')}` ({context.get('flow_run_id', '')}); "
              f"MLflow experiment `{context['experiment']}` ({exp_id}), parent run {run_link(exp_id, context['parent_run_id'])}."]
    return "\n".join(lines) + "\n", all_rows


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_losses(variants: list[dict], path: Path) -> Path:
    fig, axes = _pyplot().subplots(1, 2, figsize=(11, 4))
    for i, v in enumerate(v for v in variants if v.get("metrics_file") and not v.get("error")):
        rows = read_metric_rows(Path(v["metrics_file"]))
        flops_per_step = v["summary"]["pretrain_flops"] / max(r["step"] for r in rows)
        for ax, key in zip(axes, ("train/loss", "val/loss")):
            pts = [(r.get("train/flops", r["step"] * flops_per_step), r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o" if key == "val/loss" else None, label=v["name"], color=COLORS[i % 10])
    for ax, title in zip(axes, ("training loss", "validation loss")):
        ax.set_xlabel("training FLOPs")
        ax.set_xscale("log")
        ax.set_ylabel("loss (nats)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_downstream(variants: list[dict], cells: list[dict], methods: list[str], task_name: str, path: Path) -> Path:
    """Test accuracy and macro-F1 with their 95% intervals: one bar group per variant, one bar per method."""
    names = [v["name"] for v in variants if any(ok_cells(cells, v["name"], m) for m in methods)]
    fig, axes = _pyplot().subplots(2, 1, figsize=(min(16, max(8, 0.8 * len(names) * max(1, len(methods)) + 2)), 8))
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(names))
    for ax, metric in zip(axes, ("accuracy", "macro_f1")):
        for j, method in enumerate(methods):
            stats = [cell_summary(cells, n, method)[metric] for n in names]
            means = [0 if math.isnan(m) else m for m, _ in stats]
            halves = [0 if math.isnan(h) else h for _, h in stats]
            ax.bar(x + (j - (len(methods) - 1) / 2) * width, means, width, yerr=halves, capsize=3,
                   label=method, color=COLORS[j % 10])
        ax.set_xticks(x, names, rotation=20, ha="right")
        ax.set_title(f"{task_name}: test {metric} (mean, 95% CI)")
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_finetune_curves(variants: list[dict], cells: list[dict], methods: list[str], path: Path) -> Path:
    """Validation accuracy per fine-tuning epoch, mean over seeds, one panel per method."""
    fig, axes = _pyplot().subplots(1, len(methods), figsize=(5 * len(methods), 4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for i, v in enumerate(variants):
            runs = ok_cells(cells, v["name"], method)
            if not runs:
                continue
            n = min(len(r["curve"]) for r in runs)
            acc = np.array([[p["val_accuracy"] for p in r["curve"][:n]] for r in runs])
            epochs = np.arange(1, n + 1)
            ax.plot(epochs, acc.mean(0), marker="o" if n <= 10 else None, label=v["name"], color=COLORS[i % 10])
            if len(runs) > 1:
                ax.fill_between(epochs, acc.min(0), acc.max(0), alpha=0.12, color=COLORS[i % 10])
        ax.set_title(f"{method}: validation accuracy (mean, seed range)")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path)


def write_html(markdown_text: str, images: list[Path], path: Path, title: str) -> Path:
    """One file to share: the report rendered, the plots embedded as data URIs."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])
    figures = "".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{p.stem.replace('_', ' ')}</figcaption></figure>" for p in images)
    css = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
           "table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em}"
           "th{background:#f3f3f3}td{text-align:right}td:first-child,td:nth-child(2){text-align:left}"
           "img{max-width:100%}figure{margin:1.5em 0}figcaption{color:#666;font-size:.85em}")
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{css}</style>"
                    f"</head><body>{body}{figures}</body></html>")
    return path
