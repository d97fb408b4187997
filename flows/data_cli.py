"""`pretrain data ...`: declare sources, ingest them, and look inside the warehouse.

A Typer sub-app mounted by flows/cli.py. The queries live in warehouse/catalog.py (plain functions
returning dataclasses); this module only parses options and prints with rich. Read commands open
the warehouse read-only. A mistake the user can fix is one red `error:` line and exit code 2, as in
the rest of `pretrain`.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.bar import Bar
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Column, Table
from rich.text import Text

from tasks.workspace import Workspace, configure_environment
from warehouse import catalog, store
from warehouse.dedup import NearDupConfig
from warehouse.quality import QualityConfig
from warehouse.sources import SourceError
from warehouse.store import SPLITS, WarehouseError

data_app = typer.Typer(help="The corpus warehouse: declare sources, ingest, snapshots, statistics, export, lineage.",
                       no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
USER_ERRORS = (SourceError, WarehouseError, FileNotFoundError)


def _out() -> Console:
    # Made per command, not at import: rich reads the width (COLUMNS) and the stream when created.
    return Console(soft_wrap=True)  # long lines (paths) stay whole; tables still fit the width


def _fail(message: str, code: int = 2) -> None:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/bold red] {escape(message)}")
    raise typer.Exit(code)


def user_errors(fn: Callable) -> Callable:
    """A user's mistake (bad path, unknown snapshot, no warehouse yet) is one line, not a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return wrapper


def _db() -> Path:
    return configure_environment().warehouse


def _n(x: int | float) -> str:
    return f"{x:,}"


def _r(header: str) -> Column:
    """A right-aligned (numeric) column."""
    return Column(header, justify="right")


def _size(n_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1000 or unit == "GB":
            return f"{n_bytes:,.0f} {unit}" if unit == "B" else f"{n_bytes:,.1f} {unit}"
        n_bytes /= 1000
    return ""


def _when(t) -> str:
    return t.strftime("%Y-%m-%d %H:%M") if t else "-"


# ---------------------------------------------------------------------------------------------
# Sources


@data_app.command()
@user_errors
def add(
    name: str = typer.Argument(..., help="Source name, e.g. wiki (letters, digits, '.', '_', '-')."),
    path: Optional[str] = typer.Argument(None, help="A file, a folder (read recursively) or a quoted glob "
                                                     "(or --dataset instead)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="A Hugging Face dataset instead of PATH: a folder "
                                          "saved with save_to_disk, or a hub name owner/name (read from the local "
                                          "cache unless HF_HUB_OFFLINE=0)."),
    split: Optional[str] = typer.Option(None, "--split", help="With --dataset: the split of a DatasetDict or of a "
                                                              "hub dataset (default train)."),
    subset: Optional[str] = typer.Option(None, "--subset", help="With --dataset: a hub dataset's config name."),
    fmt: str = typer.Option("auto", "--format", help="Input format of every file: "
                            f"{', '.join(catalog.format_choices())} (auto: by content, then file name)."),
    text_field: str = typer.Option("text", "--text-field", help="The JSON field (dotted for nested, e.g. "
                                                               "meta.body) or the CSV / Parquet / dataset column of "
                                                               "the text."),
    encoding_errors: Optional[str] = typer.Option(None, "--encoding-errors", help="Invalid UTF-8: reject the "
                                                  "document (default) or replace the bytes with U+FFFD."),
    max_doc_mb: Optional[float] = typer.Option(None, "--max-doc-mb", help="A larger document is rejected unread "
                                                                          "(default 64)."),
) -> None:
    """Declare a source in the warehouse (re-adding a name with other settings replaces it)."""
    # Only the options given are stored: a declaration says what the user chose, the rest stays default.
    given = {"split": split, "subset": subset, "encoding_errors": encoding_errors, "max_doc_mb": max_doc_mb}
    settings = {k: v for k, v in given.items() if v is not None}
    d = catalog.declare_source(_db(), name, path or "", fmt, text_field, dataset=dataset or "", **settings)
    out = _out()
    where = escape(_origin(d.source.spec))
    if d.change == "added":
        out.print(f"added source [bold]{name}[/bold]: {where}")
    elif d.change == "unchanged":
        out.print(f"source [bold]{name}[/bold] is already declared with these settings: {where}")
    else:
        keys = [k for k in {**d.previous, **d.source.spec} if d.previous.get(k) != d.source.spec.get(k)]
        changed = ", ".join(f"{k} {escape(str(d.previous.get(k, 'default')))} -> "
                            f"{escape(str(d.source.spec.get(k, 'default')))}" for k in keys)
        out.print(f"replaced source [bold]{name}[/bold] ({changed})")
    note = _offline_note(d.source.spec)
    if note:
        out.print(f"[yellow]note[/yellow]: {escape(note)}")
    out.print(f"next: pretrain data ingest {name}")


def _origin(spec: dict) -> str:
    """What a declared source reads: its path, or its dataset (with the split when one is chosen)."""
    if spec.get("dataset"):
        split = f"[{spec['split']}]" if spec.get("split") else ""
        subset = f":{spec['subset']}" if spec.get("subset") else ""
        return f"hf:{spec['dataset']}{subset}{split}"
    return spec.get("path") or f"builtin:{spec.get('builtin', '')}"


def _offline_note(spec: dict) -> str | None:
    """A hub dataset that this machine cannot read now (offline, not cached): said at once, not at ingest."""
    from warehouse import hf_datasets

    dataset = spec.get("dataset", "")
    if not dataset or hf_datasets.local_folder(dataset) is not None:
        return None
    try:
        hf_datasets.fingerprint(catalog.to_source_spec(spec))
    except SourceError as exc:
        return f"`pretrain data ingest` cannot read it here yet: {exc}"
    return None


@data_app.command("sources")
@user_errors
def list_sources() -> None:
    """The declared sources."""
    declared = catalog.declared_sources(_db())
    if not declared:
        _out().print("no sources declared; declare one with `pretrain data add NAME PATH`")
        return
    table = Table("name", "path or dataset", "format", "text field", "declared (UTC)")
    for d in declared:
        table.add_row(d.name, escape(_origin(d.spec)), "-" if d.spec.get("dataset") else d.spec.get("format", "auto"),
                      d.spec.get("text_field", "text"), _when(d.added_at))
    _out().print(table)


@data_app.command()
@user_errors
def remove(name: str = typer.Argument(..., help="A declared source.")) -> None:
    """Forget a source declaration (its documents stay in the warehouse and its snapshots)."""
    if not catalog.remove_source(_db(), name):
        raise SourceError(f"source {name!r} is not declared; `pretrain data sources` lists them")
    _out().print(f"removed source [bold]{name}[/bold] (its documents and snapshots are kept)")


@data_app.command()
@user_errors
def ingest(
    names: Optional[list[str]] = typer.Argument(None, help="Declared sources to ingest (default: all)."),
    min_chars: int = typer.Option(32, "--min-chars", min=1, help="Shorter documents are rejected."),
    snapshot: Optional[str] = typer.Option(None, "--snapshot", help="Snapshot name (default: the source names)."),
    val_frac: float = typer.Option(0.05, "--val-frac", min=0.0, max=0.5, help="Share of documents in validation."),
    test_frac: float = typer.Option(0.05, "--test-frac", min=0.0, max=0.5, help="Share of documents in test."),
    quality: bool = typer.Option(True, "--quality/--no-quality", help="Apply the default quality filters."),
    near_dup: bool = typer.Option(True, "--near-dup/--no-near-dup", help="Drop near-duplicates from the snapshot (MinHash)."),
) -> None:
    """Read declared sources into the warehouse and snapshot them (same data -> same snapshot id)."""
    db = _db()
    specs = catalog.source_specs(db, names or [])
    before = {s.snapshot_id for s in catalog.list_snapshots(db)} if db.exists() else set()
    err = Console(stderr=True)
    with err.status(f"ingesting {', '.join(s.name for s in specs)} ..."):
        report = store.ingest(db, specs, min_chars, quality=QualityConfig(enabled=quality))
    out = _out()
    table = Table(_r("inputs"), _r("documents"), _r("new"), _r("rejects"), title="ingest", title_justify="left")
    table.add_row(_n(report.n_inputs), _n(report.n_documents), _n(report.n_new), _n(report.n_rejects))
    out.print(table)
    if report.reject_reasons:
        reasons = Table("reject reason", _r("inputs"), title="rejects by reason", title_justify="left")
        for reason, n in sorted(report.reject_reasons.items(), key=lambda kv: -kv[1]):
            reasons.add_row(escape(reason), _n(n))
        out.print(reasons)
        out.print("example paths: pretrain data report --rejects 3")
    if report.n_new == 0:
        out.print("[yellow]no new documents[/yellow]: every text was already in the warehouse")
    name = snapshot or "+".join(s.name for s in specs)
    with err.status("snapshot: near-duplicates ..." if near_dup else "snapshot ..."):
        info = store.create_snapshot(db, name, [s.name for s in specs], val_frac, test_frac,
                                     NearDupConfig(enabled=near_dup))
    again = " (unchanged: the same documents as before)" if info.snapshot_id in before else ""
    splits = ", ".join(f"{s} {_n(info.splits[s])}" for s in SPLITS)
    out.print(f"snapshot [bold green]{info.snapshot_id}[/bold green] {escape(info.name)}: "
              f"{_n(info.n_documents)} documents, {_n(info.n_chars or 0)} characters ({splits}){again}")


# ---------------------------------------------------------------------------------------------
# Looking inside


@data_app.command()
@user_errors
def report(
    source: Optional[str] = typer.Option(None, "--source", help="Only this source."),
    rejects: int = typer.Option(0, "--rejects", min=0, help="List N example paths per reject reason."),
) -> None:
    """Per source: every input is a document or a reject; rejects grouped by reason."""
    accounts = catalog.source_report(_db(), source, rejects)
    out = _out()
    if not accounts:
        out.print("nothing ingested yet; `pretrain data ingest` reads the declared sources")
        return
    table = Table("source", _r("inputs"), _r("accepted"), _r("rejected"), _r("documents"), _r("characters"),
                  caption="inputs = accepted + rejected; documents = distinct texts of the accepted inputs")
    for a in accounts:
        table.add_row(a.source, _n(a.inputs), _n(a.accepted), _n(a.rejected), _n(a.documents), _n(a.chars))
    out.print(table)
    if any(a.reasons for a in accounts):
        columns = ["source", "reject reason", _r("inputs")] + (["example paths"] if rejects else [])
        why = Table(*columns, title="rejects by reason", title_justify="left")
        for a in accounts:
            for reason, n in a.reasons.items():
                extra = ["\n".join(escape(p) for p in a.examples.get(reason, []))] if rejects else []
                why.add_row(a.source, escape(reason), _n(n), *extra)
        out.print(why)


@data_app.command()
@user_errors
def snapshots(json_: bool = typer.Option(False, "--json", help="JSON on stdout, for scripts.")) -> None:
    """The snapshots in the warehouse, newest first."""
    rows = catalog.list_snapshots(_db())
    if json_:
        typer.echo(json.dumps([{"snapshot_id": r.snapshot_id, "name": r.name, "created_at": r.created_at.isoformat(),
                                "n_documents": r.n_documents, "n_chars": r.n_chars, "sources": r.sources}
                               for r in rows], indent=2))
        return
    if not rows:
        _out().print("no snapshots yet; `pretrain data ingest` makes one")
        return
    table = Table(Column("id", no_wrap=True, min_width=16), "name", Column("created (UTC)", no_wrap=True),
                  _r("documents"), _r("chars"), "sources")
    for r in rows:
        table.add_row(r.snapshot_id, escape(r.name), _when(r.created_at), _n(r.n_documents), _n(r.n_chars),
                      ", ".join(r.sources))
    _out().print(table)


@data_app.command()
@user_errors
def stats(
    snapshot: str = typer.Argument(..., help="Snapshot id or a unique prefix (4+ characters)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="A tokenizer.json: count real tokens."),
    token_sample: int = typer.Option(2000, "--token-sample", min=0,
                                     help="Documents tokenized with --tokenizer (0 = all; else extrapolated)."),
    sample: int = typer.Option(2000, "--sample", min=0, help="Documents read for the script shares (0 = all)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a length histogram (e.g. lengths.png)."),
) -> None:
    """Sizes, splits, sources, scripts and the document length distribution of a snapshot."""
    db = _db()
    st = catalog.snapshot_stats(db, snapshot, sample=sample, tokenizer=tokenizer, token_sample=token_sample)
    out = _out()
    out.print(f"snapshot [bold]{st.snapshot.snapshot_id}[/bold] {escape(st.snapshot.name)} "
              f"(created {_when(st.snapshot.created_at)} UTC, sources {', '.join(st.snapshot.sources)})")
    size = Table(_r("documents"), _r("characters"), _r("words (~tokens)"), _r("chars / doc: min / median / max"))
    size.add_row(_n(st.documents), _n(st.chars), _n(st.words),
                 f"{st.min_chars:,} / {st.median_chars:,.0f} / {st.max_chars:,}")
    out.print(size)
    if st.tokens is not None:
        how = "exact" if st.tokens.exact else f"extrapolated from {st.tokens.sample_documents:,} documents"
        out.print(f"tokens ({escape(st.tokens.tokenizer)}): {_n(st.tokens.tokens)} ({how}; "
                  f"{st.tokens.tokens_per_char:.3f} tokens per character)")
    splits = Table("split", _r("docs"), _r("chars"))
    for s in SPLITS:
        splits.add_row(s, _n(st.splits[s]), _n(st.split_chars[s]))
    sources = Table("source", _r("docs"))
    for name, n in st.sources.items():
        sources.add_row(escape(name), _n(n))
    grid = Table.grid(padding=(0, 3))
    grid.add_row(splits, sources)
    out.print(grid)
    shares = ", ".join(f"{name} {share:.1%}" for name, share in st.scripts.items() if share > 0) or "no letters"
    out.print(f"scripts (share of letters in {st.script_sample:,} documents): {shares}")
    hist = Table(_r("characters"), _r("documents"), "", title="length histogram (log-spaced bins)", title_justify="left")
    top = max((b.count for b in st.histogram), default=0) or 1
    for b in st.histogram:
        hist.add_row(f"{b.low:,}-{b.high - 1:,}", _n(b.count), Bar(top, 0, b.count, width=40, color="cyan"))
    out.print(hist)
    if plot is not None:
        _plot_lengths(catalog.snapshot_lengths(db, st.snapshot.snapshot_id), plot, st.snapshot.snapshot_id)
        out.print(f"wrote {escape(str(plot))}")


def _plot_lengths(lengths: list[int], path: Path, snapshot_id: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(lengths, bins=catalog.histogram_edges(lengths), color="#4c72b0")
    ax.set_xscale("log")
    ax.set_xlabel("document length (characters)")
    ax.set_ylabel("documents")
    ax.set_title(f"snapshot {snapshot_id}: {len(lengths):,} documents")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=120)
    except ValueError as exc:  # an extension matplotlib cannot write
        raise WarehouseError(f"cannot write a plot to {path} ({str(exc).splitlines()[0]}); "
                             "use a .png, .svg or .pdf name") from None
    finally:
        plt.close(fig)


@data_app.command()
@user_errors
def sample(
    snapshot: str = typer.Argument(..., help="Snapshot id or a unique prefix (4+ characters)."),
    n: int = typer.Option(5, "-n", min=1, help="Number of documents."),
    split: str = typer.Option("train", "--split", help="train, validation, test or all."),
    seed: int = typer.Option(0, "--seed", help="Another seed, other documents."),
    chars: int = typer.Option(300, "--chars", min=1, help="Characters shown per document."),
) -> None:
    """Random documents of a snapshot with the files they came from."""
    docs = catalog.sample_documents(_db(), snapshot, n, None if split == "all" else split, seed, chars)
    out = _out()
    if not docs:
        out.print(f"no documents in split {split}")
        return
    for d in docs:
        text = Text(d.text + (" …" if d.n_chars > len(d.text) else ""))
        origins = ", ".join(f"{s}:{p}" for s, p in d.origins)
        if d.n_origins > len(d.origins):
            origins += f" (+{d.n_origins - len(d.origins)} more)"
        out.print(Panel(text, title=f"{d.doc_id[:12]} · {d.split} · {d.n_chars:,} chars", title_align="left",
                        subtitle=escape(origins), subtitle_align="left"))


@data_app.command()
@user_errors
def export(
    snapshot: str = typer.Argument(..., help="Snapshot id or a unique prefix (4+ characters)."),
    out_dir: Path = typer.Argument(..., help="An empty (or new) folder."),
    partition: str = typer.Option("split", "--partition", help="split (hive layout split=train/...), source or none."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous export in OUT_DIR."),
) -> None:
    """The snapshot as Parquet files (doc_id, text, n_chars, split, source, path) + _snapshot.json."""
    r = catalog.export_snapshot(_db(), snapshot, out_dir, partition, overwrite)
    splits = ", ".join(f"{s} {_n(r.splits[s])}" for s in SPLITS)
    out = _out()
    out.print(f"exported snapshot [bold]{r.snapshot_id}[/bold] to {escape(str(r.out_dir))}: {r.files} Parquet files, "
              f"{_size(r.bytes)}")
    out.print(f"read back with DuckDB: {_n(r.rows)} documents ({splits}), as in the snapshot")
    glob = f"{r.out_dir}/**/*.parquet"
    out.print(escape(f"query it: duckdb -c \"SELECT split, count(*) FROM read_parquet('{glob}', "
                     "hive_partitioning=true) GROUP BY split\""))


@data_app.command()
@user_errors
def lineage(
    ref: str = typer.Argument(..., metavar="SNAPSHOT_OR_RUN_ID", help="A snapshot id (or prefix) or an MLflow run id."),
    json_: bool = typer.Option(False, "--json", help="JSON on stdout, for scripts."),
) -> None:
    """The input files that fed a snapshot, or the snapshot an MLflow run trained on."""
    ws = configure_environment()
    run = None
    sid = catalog.find_snapshot(ws.warehouse, ref)
    if sid is None:
        sid, run = _snapshot_of_run(ws, ref)
        if catalog.find_snapshot(ws.warehouse, sid) is None:
            raise WarehouseError(f"MLflow run {ref} used snapshot {sid}, which is not in the warehouse at "
                                 f"{ws.warehouse} (was PRETRAIN_HOME different for that run?)")
    lin = catalog.snapshot_lineage(ws.warehouse, sid)
    if json_:
        typer.echo(json.dumps({
            "snapshot_id": lin.snapshot.snapshot_id, "name": lin.snapshot.name, "n_documents": lin.documents,
            "sources": lin.snapshot.sources, "run": run,
            "files": [{"source": f.source, "path": f.path, "documents": f.documents} for f in lin.files]}, indent=2))
        return
    out = _out()
    if run:
        via = f" (via parent run {run['found_on']})" if run["found_on"] != run["run_id"] else ""
        out.print(f"MLflow run {run['run_id']} ({escape(run['run_name'] or '')}) trained on snapshot "
                  f"{lin.snapshot.snapshot_id}{via}")
    out.print(f"snapshot [bold]{lin.snapshot.snapshot_id}[/bold] {escape(lin.snapshot.name)}: "
              f"{_n(lin.documents)} documents from {_n(len(lin.files))} file{'s' if len(lin.files) != 1 else ''}")
    table = Table("source", "file", _r("documents"))
    for f in lin.files:
        table.add_row(escape(f.source), escape(f.path), _n(f.documents))
    out.print(table)


def _snapshot_of_run(ws: Workspace, run_id: str) -> tuple[str, dict]:
    """The snapshot_id param (or tag) of an MLflow run of this workspace, or of its parent runs (a
    fine-tuning cell's snapshot is on its variant run)."""
    hint = f"no snapshot {run_id!r} in the warehouse and no MLflow run with that id; {catalog.LIST_HINT}"
    if ws.local_mlflow and not ws.mlflow_db.exists():  # opening a missing SQLite store would create one
        raise WarehouseError(hint)
    from mlflow.exceptions import MlflowException

    from tasks.tracking import client

    c = client(ws)
    current, first = run_id, None
    for _ in range(4):
        try:
            r = c.get_run(current)
        except MlflowException:
            raise WarehouseError(hint) from None
        first = first or r
        sid = r.data.params.get("snapshot_id") or r.data.tags.get("snapshot_id")
        if sid:
            return sid, {"run_id": run_id, "run_name": first.info.run_name, "found_on": current}
        current = r.data.tags.get("mlflow.parentRunId")
        if not current:
            break
    raise WarehouseError(f"MLflow run {run_id} has no snapshot_id param or tag (nor its parent runs); "
                         "only runs of `pretrain run / demo / compare` record their snapshot")
