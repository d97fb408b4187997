"""The DuckDB warehouse: documents keyed by content hash, provenance, rejects, snapshots, splits.

Callers pass the database path, never a connection: DuckDB allows one writing process, and each
function holds its connection only for its own work.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import duckdb
import pyarrow as pa

from warehouse.sources import Reject, SourceSpec, normalize, read_source

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    doc_id VARCHAR PRIMARY KEY, text VARCHAR NOT NULL, n_chars INTEGER NOT NULL, first_seen TIMESTAMP);
CREATE TABLE IF NOT EXISTS provenance (
    doc_id VARCHAR, source VARCHAR, path VARCHAR, label VARCHAR, PRIMARY KEY (doc_id, source, path));
CREATE TABLE IF NOT EXISTS rejects (
    source VARCHAR, path VARCHAR, reason VARCHAR, seen TIMESTAMP, PRIMARY KEY (source, path, reason));
CREATE TABLE IF NOT EXISTS ingests (
    ingest_id VARCHAR, sources VARCHAR, finished_at TIMESTAMP, n_inputs INTEGER, n_documents INTEGER,
    n_new INTEGER, n_rejects INTEGER);
CREATE TABLE IF NOT EXISTS snapshots (
    snapshot_id VARCHAR PRIMARY KEY, name VARCHAR, created_at TIMESTAMP, n_documents BIGINT,
    n_chars BIGINT, spec VARCHAR);
CREATE TABLE IF NOT EXISTS snapshot_documents (snapshot_id VARCHAR, doc_id VARCHAR, split VARCHAR);
CREATE TABLE IF NOT EXISTS task_examples (
    task VARCHAR, doc_id VARCHAR, label VARCHAR, split VARCHAR, text_pair VARCHAR, PRIMARY KEY (task, doc_id));
"""
# Migrations for a warehouse created by an older SCHEMA (each is a no-op on a current one).
MIGRATIONS = """
ALTER TABLE task_examples ADD COLUMN IF NOT EXISTS text_pair VARCHAR;
"""
SPLITS = ("train", "validation", "test")


class WarehouseError(ValueError):
    pass


@contextlib.contextmanager
def connect(db_path: str | Path, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    db_path = Path(db_path)
    if read_only and not db_path.exists():
        raise WarehouseError(f"no warehouse at {db_path}; run the ingest stage first")
    db_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = duckdb.connect(str(db_path), read_only=read_only)
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            holder = re.search(r"PID (\d+)", str(exc))
            who = f" (pid {holder.group(1)})" if holder else ""
            raise WarehouseError(f"warehouse {db_path} is open for writing by another process{who}; wait for it "
                                 "to finish, or point PRETRAIN_HOME elsewhere") from None
        raise
    try:
        if not read_only:
            con.execute(SCHEMA)
            con.execute(MIGRATIONS)
        yield con
    finally:
        con.close()


def doc_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def assign_split(key: str, salt: str, val_frac: float, test_frac: float) -> str:
    """Deterministic and stable as data grows: depends on the document alone, never on the set."""
    u = int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()[:12], 16) / 16**12
    return "validation" if u < val_frac else "test" if u < val_frac + test_frac else "train"


@dataclass
class IngestReport:
    n_inputs: int = 0
    n_documents: int = 0
    n_new: int = 0
    n_rejects: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)


def ingest(db_path: str | Path, sources: list[SourceSpec], min_chars: int = 32) -> IngestReport:
    """Read every source into the warehouse. Idempotent: documents are keyed by content hash."""
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    docs: dict[str, str] = {}
    prov: dict[tuple[str, str, str], str] = {}
    rejects: dict[tuple[str, str, str], None] = {}
    report = IngestReport()
    per_source: dict[str, Counter] = {spec.name: Counter() for spec in sources}
    for spec in sources:
        for item in read_source(spec):
            report.n_inputs += 1
            per_source[spec.name]["inputs"] += 1
            if isinstance(item, Reject):
                rejects[(item.source, item.path, item.reason)] = None
                continue
            text = normalize(item.text)
            if not text:
                rejects[(item.source, item.path, "empty after cleaning")] = None
                continue
            if len(text) < min_chars:
                rejects[(item.source, item.path, f"too short (< {min_chars} characters; corpus.min_chars)")] = None
                continue
            did = doc_id(text)
            docs[did] = text
            per_source[spec.name]["documents"] += 1
            prov[(did, item.source, item.path)] = item.label
    report.n_documents = len(docs)
    report.n_rejects = len(rejects)
    report.reject_reasons = dict(Counter(r.split(":")[0].split(" (")[0] for (_, _, r) in rejects))
    with connect(db_path) as con:
        con.begin()
        # One transaction: a crash anywhere before the commit leaves the warehouse as it was.
        con.register("new_documents", pa.table(
            {"doc_id": list(docs), "text": list(docs.values()),
             "n_chars": [len(t) for t in docs.values()], "first_seen": [now] * len(docs)}))
        before = con.execute("SELECT count(*) FROM documents").fetchall()[0][0]
        con.execute("INSERT OR IGNORE INTO documents SELECT * FROM new_documents")
        report.n_new = con.execute("SELECT count(*) FROM documents").fetchall()[0][0] - before
        con.register("new_provenance", pa.table(
            {"doc_id": [k[0] for k in prov], "source": [k[1] for k in prov],
             "path": [k[2] for k in prov], "label": list(prov.values())}))
        con.execute("INSERT OR IGNORE INTO provenance SELECT * FROM new_provenance")
        con.register("new_rejects", pa.table(
            {"source": [k[0] for k in rejects], "path": [k[1] for k in rejects],
             "reason": [k[2] for k in rejects], "seen": [now] * len(rejects)}))
        con.execute("INSERT OR IGNORE INTO rejects SELECT * FROM new_rejects")
        spec_json = json.dumps([asdict(s) for s in sources], sort_keys=True)
        con.execute("INSERT INTO ingests VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [hashlib.sha256(spec_json.encode()).hexdigest()[:16], spec_json, now,
                     report.n_inputs, report.n_documents, report.n_new, report.n_rejects])
        con.commit()
    del con  # a traceback must not keep a DuckDB object alive (its bindings report leaks at exit)
    for name, n in per_source.items():
        if n["documents"] == 0:
            reasons = Counter(r.split(":")[0].split(" (")[0] for (src, _, r) in rejects if src == name)
            why = ", ".join(f"{k} {r}" for r, k in reasons.items()) or "no input files"
            raise WarehouseError(f"the corpus is empty: {n['inputs']} inputs gave no documents ({why}); "
                                 f"point source {name!r} at .txt / .md / .jsonl files with text")
    return report


@dataclass
class LabelTask:
    name: str
    labels: list[str]
    counts: dict[str, dict[str, int]]  # split -> n examples
    pair: bool = False  # a text-pair task: task_split returns the second texts too
    n_duplicates: int = 0  # input rows dropped as repeats of an earlier example (same id)
    n_rejected: int = 0  # input rows left out for an empty or missing text, pair, label or split


def define_label_task(db_path: str | Path, task: str, source: str, n_classes: int, min_chars: int,
                      val_frac: float, test_frac: float) -> LabelTask:
    """A classification task over labelled documents of `source`: the `n_classes` most frequent labels."""
    with connect(db_path) as con:
        rows = con.execute(
            """SELECT p.doc_id, any_value(p.label) AS label FROM provenance p JOIN documents d USING (doc_id)
               WHERE p.source = ? AND p.label <> '' AND d.n_chars >= ?
               GROUP BY p.doc_id HAVING count(DISTINCT p.label) = 1""",  # ambiguous texts are left out
            [source, min_chars]).fetchall()
    del con
    freq = Counter(label for _, label in rows if not label.startswith("_"))
    labels = sorted(label for label, _ in freq.most_common(n_classes))
    if len(labels) < 2:
        raise WarehouseError(f"task {task!r} needs labelled documents in source {source!r}; found {len(labels)} label(s)"
                             "; set downstream.task=none for a corpus without the built-in task")
    with connect(db_path) as con:
        chosen = [(d, lab) for d, lab in rows if lab in labels]
        examples = pa.table(  # noqa: F841 - read by name in the SQL below (DuckDB replacement scan)
            {"task": [task] * len(chosen), "doc_id": [d for d, _ in chosen],
             "label": [lab for _, lab in chosen],
             "split": [assign_split(d, task, val_frac, test_frac) for d, _ in chosen]})
        con.begin()
        con.execute("DELETE FROM task_examples WHERE task = ?", [task])
        con.execute("INSERT INTO task_examples (task, doc_id, label, split) SELECT task, doc_id, label, split FROM examples")
        con.commit()
        counts = con.execute("SELECT split, count(*) FROM task_examples WHERE task = ? GROUP BY split", [task]).fetchall()
    return LabelTask(task, labels, {"total": len(chosen), **{s: n for s, n in counts}})


@dataclass
class SnapshotInfo:
    snapshot_id: str
    name: str
    n_documents: int
    n_chars: int
    splits: dict[str, int]


def create_snapshot(db_path: str | Path, name: str, sources: list[str], val_frac: float, test_frac: float) -> SnapshotInfo:
    """The immutable pretraining document set of `sources`, minus every downstream-task document.

    Its id hashes the member documents and the split rule, so the same data gives the same id.
    The doc_id of a text-pair example hashes both its texts (see warehouse.task_files), so a corpus
    document equal to either text is excluded by that text's own content hash.
    """
    with connect(db_path) as con:
        placeholders = ", ".join("?" for _ in sources)
        ids = [r[0] for r in con.execute(
            f"""SELECT DISTINCT doc_id FROM provenance WHERE source IN ({placeholders})
                AND doc_id NOT IN (SELECT doc_id FROM task_examples)
                AND doc_id NOT IN (
                    SELECT sha256(d.text) FROM task_examples t JOIN documents d USING (doc_id)
                    WHERE t.text_pair IS NOT NULL
                    UNION ALL SELECT sha256(text_pair) FROM task_examples WHERE text_pair IS NOT NULL)
                ORDER BY doc_id""", sources).fetchall()]
    del con
    if not ids:
        raise WarehouseError(f"no pretraining documents in sources {sources}; ingest them first")
    with connect(db_path) as con:
        spec = {"sources": sorted(sources), "val_frac": val_frac, "test_frac": test_frac, "split_salt": "pretrain"}
        h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
        for d in ids:
            h.update(d.encode())
        snapshot_id = h.hexdigest()[:16]
        exists = con.execute("SELECT 1 FROM snapshots WHERE snapshot_id = ?", [snapshot_id]).fetchone()
        if not exists:
            members = pa.table(  # noqa: F841 - read by name in the SQL below (DuckDB replacement scan)
                {"snapshot_id": [snapshot_id] * len(ids), "doc_id": ids,
                 "split": [assign_split(d, "pretrain", val_frac, test_frac) for d in ids]})
            con.begin()
            con.execute("INSERT INTO snapshot_documents SELECT * FROM members")
            n_chars = con.execute("SELECT sum(n_chars) FROM documents JOIN members USING (doc_id)").fetchone()[0]
            con.execute("INSERT INTO snapshots VALUES (?, ?, ?, ?, ?, ?)",
                        [snapshot_id, name, datetime.now(timezone.utc).replace(tzinfo=None), len(ids), n_chars, json.dumps(spec)])
            con.commit()
        return snapshot_info(con, snapshot_id)


def snapshot_info(con: duckdb.DuckDBPyConnection, snapshot_id: str) -> SnapshotInfo:
    row = con.execute("SELECT name, n_documents, n_chars FROM snapshots WHERE snapshot_id = ?", [snapshot_id]).fetchone()
    if row is None:
        raise WarehouseError(f"snapshot {snapshot_id} is not in the warehouse")
    splits = dict(con.execute(
        "SELECT split, count(*) FROM snapshot_documents WHERE snapshot_id = ? GROUP BY split", [snapshot_id]).fetchall())
    return SnapshotInfo(snapshot_id, row[0], row[1], row[2], {s: splits.get(s, 0) for s in SPLITS})


def iter_texts(db_path: str | Path, snapshot_id: str, split: str, batch: int = 2048) -> Iterator[list[str]]:
    """Texts of one split of a snapshot in doc_id order, in batches."""
    with connect(db_path, read_only=True) as con:
        cur = con.execute(
            """SELECT d.text FROM snapshot_documents s JOIN documents d USING (doc_id)
               WHERE s.snapshot_id = ? AND s.split = ? ORDER BY d.doc_id""", [snapshot_id, split])
        while rows := cur.fetchmany(batch):
            yield [r[0] for r in rows]


def _text_pair_sql(con: duckdb.DuckDBPyConnection) -> str:
    """`t.text_pair`, or a NULL for a warehouse older than that column opened read-only (not migrated)."""
    has = con.execute("""SELECT count(*) FROM duckdb_columns()
                         WHERE table_name = 'task_examples' AND column_name = 'text_pair'""").fetchone()[0]
    return "t.text_pair" if has else "NULL::VARCHAR"


def task_split(db_path: str | Path, task: str, split: str) -> tuple[list[str], list[str] | None, list[str]]:
    """(texts, text_pairs, labels) of one split in doc_id order; text_pairs is None for a single-text task."""
    with connect(db_path, read_only=True) as con:
        pair = _text_pair_sql(con)
        is_pair = con.execute(f"SELECT coalesce(bool_or({pair} IS NOT NULL), false) FROM task_examples t "
                              "WHERE t.task = ?", [task]).fetchone()[0]
        rows = con.execute(
            f"""SELECT d.text, {pair}, t.label FROM task_examples t JOIN documents d USING (doc_id)
                WHERE t.task = ? AND t.split = ? ORDER BY t.doc_id""", [task, split]).fetchall()
    return [r[0] for r in rows], ([r[1] for r in rows] if is_pair else None), [r[2] for r in rows]
