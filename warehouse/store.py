"""The DuckDB warehouse: documents keyed by content hash, provenance, rejects, snapshots, splits.

Callers pass the database path, never a connection: DuckDB allows one writing process, and each
function holds its connection only for its own work.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, NamedTuple

import duckdb
import numpy as np
import pyarrow as pa

from warehouse.dedup import NearDupConfig, near_duplicates
from warehouse.quality import QualityConfig
from warehouse.quality import check as quality_check
from warehouse.sources import RawDoc, Reject, SourceSpec, normalize, read_source

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
CREATE TABLE IF NOT EXISTS snapshot_near_duplicates (
    snapshot_id VARCHAR, doc_id VARCHAR, duplicate_of VARCHAR, jaccard DOUBLE);
CREATE TABLE IF NOT EXISTS task_examples (
    task VARCHAR, doc_id VARCHAR, label VARCHAR, split VARCHAR, text_pair VARCHAR, source_doc VARCHAR,
    PRIMARY KEY (task, doc_id));
"""
# Migrations for a warehouse created by an older SCHEMA (each is a no-op on a current one).
MIGRATIONS = """
ALTER TABLE task_examples ADD COLUMN IF NOT EXISTS text_pair VARCHAR;
ALTER TABLE task_examples ADD COLUMN IF NOT EXISTS source_doc VARCHAR;
"""
SPLITS = ("train", "validation", "test")


class WarehouseError(ValueError):
    pass


def memory_limit() -> str:
    """DuckDB's buffer pool limit. Its default, 80% of RAM, keeps every page an ingest writes or a read
    touches, so a process's memory grew with the corpus; under a fixed limit pages are evicted. A sort of
    text can fail at the limit (DuckDB does not spill its strings), so text is never sorted in DuckDB:
    big reads stream in storage order and `iter_docs` restores doc_id order itself."""
    return os.environ.get("PRETRAIN_DUCKDB_MEMORY", "512MB")


@contextlib.contextmanager
def connect(db_path: str | Path, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    db_path = Path(db_path)
    if read_only and not db_path.exists():
        raise WarehouseError(f"no warehouse at {db_path}; run the ingest stage first")
    db_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = duckdb.connect(str(db_path), read_only=read_only, config={
            "memory_limit": memory_limit(), "temp_directory": str(db_path) + ".tmp"})
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


# An ingest commits every batch of this many documents or characters, whichever comes first: memory
# stays flat in the corpus size, and a killed ingest loses at most one batch (the next run redoes it).
BATCH_DOCS = 20_000
BATCH_CHARS = 16 * 2**20  # peak memory ~500 MB (64 MB batches: ~800 MB, no faster; measured on 64 MB of text)
# Cleaning (sources.normalize, pure Python) is the slowest step of an ingest, so once a corpus has
# shown it is big, its texts are cleaned in worker processes, CHUNK_CHARS at a time.
POOL_AFTER_CHARS = 16 * 2**20
CHUNK_CHARS, CHUNK_ITEMS = 2**20, 1024


@dataclass
class IngestReport:
    n_inputs: int = 0  # files, archive members and .jsonl lines read: each is a document, a duplicate or a reject
    n_documents: int = 0  # distinct texts among the inputs
    n_new: int = 0  # documents the warehouse did not hold before
    n_rejects: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)  # reason category -> inputs
    n_duplicates: int = 0  # inputs whose text equals an earlier input's in this ingest (lineage keeps both paths)


def reason_category(reason: str) -> str:
    """The words before ":" or " (": "unreadable: Permission denied" -> "unreadable"."""
    return reason.split(":")[0].split(" (")[0]


class _SeenIds:
    """The content hashes met so far in one ingest, as a sorted array of their 64-bit prefixes.

    8 bytes a document instead of a Python set's ~80; two different texts share a prefix with
    probability ~n^2 / 2^65 (1e-7 at two million documents), and then only the counts are off by one.
    """

    def __init__(self) -> None:
        self.keys = np.empty(0, dtype=np.uint64)

    def add(self, ids: list[str]) -> int:
        """Adds distinct hex ids; returns how many of them were already there."""
        new = np.fromiter((int(d[:16], 16) for d in ids), dtype=np.uint64, count=len(ids))
        pos = np.searchsorted(self.keys, new)
        found = np.zeros(len(new), dtype=bool)
        inside = pos < len(self.keys)
        found[inside] = self.keys[pos[inside]] == new[inside]
        # Two sorted runs: the stable sort (timsort) merges them in linear time.
        self.keys = np.sort(np.concatenate([self.keys, np.sort(new[~found])]), kind="stable")
        return int(found.sum())


@dataclass
class _Batch:
    docs: dict[str, str] = field(default_factory=dict)  # doc_id -> text, its first input in the batch
    prov: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (doc_id, source, path) -> label
    rejects: dict[tuple[str, str, str], None] = field(default_factory=dict)  # (source, path, reason)
    n_chars: int = 0
    n_duplicates: int = 0  # inputs repeating a text already in `docs`

    def full(self, batch_docs: int, batch_chars: int) -> bool:
        return len(self.prov) + len(self.rejects) >= batch_docs or self.n_chars >= batch_chars


def _write_batch(con: duckdb.DuckDBPyConnection, batch: _Batch, seen: _SeenIds, now: datetime,
                 report: IngestReport) -> None:
    """One transaction: the batch's documents, lineage and rejects; INSERT OR IGNORE makes a re-run a no-op."""
    if not (batch.prov or batch.rejects):
        return
    earlier = seen.add(list(batch.docs))  # texts an earlier batch of this ingest already had
    report.n_documents += len(batch.docs) - earlier
    report.n_duplicates += batch.n_duplicates + earlier
    con.begin()
    con.register("new_documents", pa.table(
        {"doc_id": list(batch.docs), "text": list(batch.docs.values()),
         "n_chars": [len(t) for t in batch.docs.values()], "first_seen": [now] * len(batch.docs)}))
    report.n_new += con.execute("INSERT OR IGNORE INTO documents SELECT * FROM new_documents").fetchone()[0]
    con.register("new_provenance", pa.table(
        {"doc_id": [k[0] for k in batch.prov], "source": [k[1] for k in batch.prov],
         "path": [k[2] for k in batch.prov], "label": list(batch.prov.values())}))
    con.execute("INSERT OR IGNORE INTO provenance SELECT * FROM new_provenance")
    con.register("new_rejects", pa.table(
        {"source": [k[0] for k in batch.rejects], "path": [k[1] for k in batch.rejects],
         "reason": [k[2] for k in batch.rejects], "seen": [now] * len(batch.rejects)}))
    con.execute("INSERT OR IGNORE INTO rejects SELECT * FROM new_rejects")
    con.commit()
    for name in ("new_documents", "new_provenance", "new_rejects"):
        con.unregister(name)  # lets the batch's Arrow buffers go


class _Cleaned(NamedTuple):
    source: str  # the source declaration that read it
    item_source: str
    path: str
    label: str
    text: str  # normalized; "" for a reject
    doc_id: str  # "" for a reject
    reason: str  # why it is a reject; "" for a document


def _clean(texts: list[str], min_chars: int, quality: QualityConfig | None = None) -> list[tuple[str, str, str]]:
    """(text, doc_id, "") of each raw text that makes a document, ("", "", reason) of the others."""
    out = []
    for raw in texts:
        text = normalize(raw)
        if not text:
            out.append(("", "", "empty after cleaning"))
        elif len(text) < min_chars:
            out.append(("", "", f"too short (< {min_chars} characters; corpus.min_chars)"))
        elif quality is not None and (reason := quality_check(text, quality)):
            out.append(("", "", reason))
        else:
            out.append((text, doc_id(text), ""))
    return out


def _exit_when_orphaned() -> None:
    """Worker initializer: a worker whose ingest was killed (SIGKILL) exits instead of waiting forever."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes for `_clean`. Forked on Linux: nothing to import, and a caller's script needs no
    `if __name__ == "__main__"` guard (the workers touch no DuckDB, tokenizers or thread state)."""
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_exit_when_orphaned)


def _cleaned(items: Iterator[tuple[str, RawDoc | Reject]], min_chars: int, workers: int,
             quality: QualityConfig | None = None) -> Iterator[_Cleaned]:
    """Every (source name, input), cleaned, in order. Past POOL_AFTER_CHARS of raw text the chunks go
    to `workers` processes, at most workers + 1 chunks in flight, so memory stays bounded."""
    pool: ProcessPoolExecutor | None = None
    in_flight: collections.deque = collections.deque()  # (chunk's inputs without their texts, future)
    chunk: list[tuple[str, RawDoc | Reject]] = []
    chunk_chars = read_chars = 0

    def results(inputs: list[tuple], cleaned: list[tuple[str, str, str]]) -> Iterator[_Cleaned]:
        texts = iter(cleaned)
        for name, source, path, label, reason in inputs:
            text, did, reason = ("", "", reason) if reason else next(texts)
            yield _Cleaned(name, source, path, label, text, did, reason)

    def dispatch(chunk: list[tuple[str, RawDoc | Reject]]) -> Iterator[_Cleaned]:
        nonlocal pool
        inputs = [(name, item.source, item.path, getattr(item, "label", ""), getattr(item, "reason", ""))
                  for name, item in chunk]
        texts = [item.text for _, item in chunk if not isinstance(item, Reject)]
        if pool is None and workers > 1 and read_chars >= POOL_AFTER_CHARS:
            pool = _pool(workers)
        if pool is None:
            yield from results(inputs, _clean(texts, min_chars, quality))
            return
        in_flight.append((inputs, pool.submit(_clean, texts, min_chars, quality)))
        while len(in_flight) > workers:  # one chunk a worker, and one queued: all busy, memory bounded
            inputs, future = in_flight.popleft()
            yield from results(inputs, future.result())

    try:
        for name, item in items:
            chunk.append((name, item))
            if not isinstance(item, Reject):
                chunk_chars += len(item.text)
                read_chars += len(item.text)
            if chunk_chars >= CHUNK_CHARS or len(chunk) >= CHUNK_ITEMS:
                yield from dispatch(chunk)
                chunk, chunk_chars = [], 0
        yield from dispatch(chunk)
        while in_flight:
            inputs, future = in_flight.popleft()
            yield from results(inputs, future.result())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _primed(items: Iterator) -> Iterator:
    """Starts a source's reader, so that a declaration mistake (a missing path) fails before any write."""
    first = next(items, None)
    return items if first is None else itertools.chain([first], items)


def ingest(db_path: str | Path, sources: list[SourceSpec], min_chars: int = 32,
           batch_docs: int = BATCH_DOCS, batch_chars: int = BATCH_CHARS, workers: int | None = None,
           quality: QualityConfig | None = None) -> IngestReport:
    """Reads every source into the warehouse, streaming, one committed batch at a time.

    Idempotent: documents are keyed by content hash and every row is INSERT OR IGNORE, so the run
    after a killed one completes the work. The `ingests` row, the record of a finished ingest, is
    written last. One connection for the whole run: a second writer is refused with a clear error.
    `workers`: processes that clean texts of a big corpus (default: the CPUs this process may use).
    `quality`: the document filters (warehouse.quality); a document that fails one is a reject.
    """
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    readers = [(spec.name, _primed(read_source(spec))) for spec in sources]
    workers = workers or len(os.sched_getaffinity(0))
    report = IngestReport()
    inputs: Counter = Counter()  # source -> inputs read
    accepted: Counter = Counter()  # source -> inputs that gave a document (or repeated one)
    rejected: dict[str, Counter] = {spec.name: Counter() for spec in sources}  # source -> reason category -> n
    with connect(db_path) as con:
        seen, batch = _SeenIds(), _Batch()
        items = ((name, item) for name, reader in readers for item in reader)
        for c in _cleaned(items, min_chars, workers, quality):
            inputs[c.source] += 1
            if c.reason:
                batch.rejects[(c.item_source, c.path, c.reason)] = None
                rejected[c.source][reason_category(c.reason)] += 1
            else:
                if c.doc_id in batch.docs:
                    batch.n_duplicates += 1
                else:
                    batch.docs[c.doc_id] = c.text
                    batch.n_chars += len(c.text)
                batch.prov[(c.doc_id, c.item_source, c.path)] = c.label
                accepted[c.source] += 1
            if batch.full(batch_docs, batch_chars):
                _write_batch(con, batch, seen, now, report)
                batch = _Batch()
        _write_batch(con, batch, seen, now, report)
        reasons = sum(rejected.values(), Counter())
        report.n_inputs, report.n_rejects = sum(inputs.values()), sum(reasons.values())
        report.reject_reasons = dict(reasons)
        spec_json = json.dumps([asdict(s) for s in sources], sort_keys=True)
        con.execute("INSERT INTO ingests VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [hashlib.sha256(spec_json.encode()).hexdigest()[:16], spec_json, now,
                     report.n_inputs, report.n_documents, report.n_new, report.n_rejects])
    del con  # a traceback must not keep a DuckDB object alive (its bindings report leaks at exit)
    for spec in sources:
        if accepted[spec.name] == 0:
            why = ", ".join(f"{k} {r}" for r, k in rejected[spec.name].items()) or "no input files"
            raise WarehouseError(f"the corpus is empty: {inputs[spec.name]} inputs gave no documents ({why}); "
                                 + (f"check source {spec.name!r}'s text_field" if spec.dataset else
                                    f"point source {spec.name!r} at .txt / .md / .jsonl files with text"))
    return report


def replace_task_examples(db_path: str | Path, task: str, doc_ids: list[str], texts: list[str], labels: list[str],
                          splits: list[str], text_pairs: list[str | None] | None = None,
                          source_docs: list[str | None] | None = None) -> None:
    """Task `task`'s examples replaced in one transaction; their texts stored as documents (by content hash)."""
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    n = len(doc_ids)
    new_documents = pa.table(  # noqa: F841 - read by name in the SQL below (DuckDB replacement scan)
        {"doc_id": doc_ids, "text": texts, "n_chars": pa.array([len(t) for t in texts], pa.int32()),
         "first_seen": [now] * n},
        schema=pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("n_chars", pa.int32()),
                          ("first_seen", pa.timestamp("us"))]))
    examples = pa.table(  # noqa: F841 - read by name in the SQL below
        {"task": [task] * n, "doc_id": doc_ids, "label": labels, "split": splits,
         "text_pair": pa.array(text_pairs or [None] * n, pa.string()),
         "source_doc": pa.array(source_docs or [None] * n, pa.string())})
    with connect(db_path) as con:
        con.begin()
        try:
            con.execute("""INSERT OR IGNORE INTO documents (doc_id, text, n_chars, first_seen)
                           SELECT doc_id, text, n_chars, first_seen FROM new_documents""")
            con.execute("DELETE FROM task_examples WHERE task = ?", [task])
            con.execute("""INSERT INTO task_examples (task, doc_id, label, split, text_pair, source_doc)
                           SELECT task, doc_id, label, split, text_pair, source_doc FROM examples""")
            con.commit()
        except BaseException:
            con.rollback()
            raise
    del con  # a traceback must not keep a DuckDB object alive


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


def create_snapshot(db_path: str | Path, name: str, sources: list[str], val_frac: float, test_frac: float,
                    near_dup: NearDupConfig | None = None) -> SnapshotInfo:
    """The immutable pretraining document set of `sources`, minus every downstream-task document
    and, with `near_dup`, minus near-duplicates (recorded in `snapshot_near_duplicates`).

    Its id hashes the member documents, the split rule and the dedup settings, so the same data
    gives the same id.
    A document a task example was derived from (`source_doc`, e.g. a shuffled passage) is left out too.
    The doc_id of a text-pair example hashes both its texts (see warehouse.task_files), so a corpus
    document equal to either text is excluded by that text's own content hash.
    """
    with connect(db_path) as con:
        placeholders = ", ".join("?" for _ in sources)
        ids = [r[0] for r in con.execute(
            f"""SELECT DISTINCT doc_id FROM provenance WHERE source IN ({placeholders})
                AND doc_id NOT IN (SELECT doc_id FROM task_examples)
                AND doc_id NOT IN (SELECT source_doc FROM task_examples WHERE source_doc IS NOT NULL)
                AND doc_id NOT IN (
                    SELECT sha256(d.text) FROM task_examples t JOIN documents d USING (doc_id)
                    WHERE t.text_pair IS NOT NULL
                    UNION ALL SELECT sha256(text_pair) FROM task_examples WHERE text_pair IS NOT NULL)
                ORDER BY doc_id""", sources).fetchall()]
    del con
    if not ids:
        raise WarehouseError(f"no pretraining documents in sources {sources}; ingest them first")
    dropped = []
    if near_dup is not None and near_dup.enabled:
        dropped = near_duplicates(_texts_of(db_path, ids), near_dup)
        gone = {d.doc_id for d in dropped}
        ids = [d for d in ids if d not in gone]
    with connect(db_path) as con:
        spec = {"sources": sorted(sources), "val_frac": val_frac, "test_frac": test_frac, "split_salt": "pretrain"}
        if near_dup is not None and near_dup.enabled:
            spec["near_dup"] = asdict(near_dup)
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
            if dropped:
                near = pa.table(  # noqa: F841 - read by name in the SQL below
                    {"snapshot_id": [snapshot_id] * len(dropped), "doc_id": [d.doc_id for d in dropped],
                     "duplicate_of": [d.duplicate_of for d in dropped], "jaccard": [d.jaccard for d in dropped]})
                con.execute("INSERT INTO snapshot_near_duplicates SELECT * FROM near")
            con.commit()
        return snapshot_info(con, snapshot_id)


def _texts_of(db_path: str | Path, ids: list[str], batch: int = 4096) -> Iterator[tuple[str, str]]:
    """(doc_id, text) of `ids`, streamed from the warehouse in batches, in storage order (no sort of the text)."""
    with connect(db_path, read_only=True) as con:
        con.register("wanted", pa.table({"doc_id": ids}))
        cur = con.execute("SELECT doc_id, text FROM documents JOIN wanted USING (doc_id)")
        while rows := cur.fetchmany(batch):
            yield from rows


def snapshot_info(con: duckdb.DuckDBPyConnection, snapshot_id: str) -> SnapshotInfo:
    row = con.execute("SELECT name, n_documents, n_chars FROM snapshots WHERE snapshot_id = ?", [snapshot_id]).fetchone()
    if row is None:
        raise WarehouseError(f"snapshot {snapshot_id} is not in the warehouse")
    splits = dict(con.execute(
        "SELECT split, count(*) FROM snapshot_documents WHERE snapshot_id = ? GROUP BY split", [snapshot_id]).fetchall())
    return SnapshotInfo(snapshot_id, row[0], row[1], row[2], {s: splits.get(s, 0) for s in SPLITS})


def iter_texts(db_path: str | Path, snapshot_id: str, split: str, batch: int = 2048,
               ordered: bool = True) -> Iterator[list[str]]:
    """Texts of one split of a snapshot, in batches: in doc_id order, or with `ordered=False` in storage
    order, streamed without a sort (memory flat in the split's size; for readers that do not need order)."""
    for _, texts in iter_docs(db_path, snapshot_id, split, batch, ordered):
        yield texts


def iter_docs(db_path: str | Path, snapshot_id: str, split: str, batch: int = 2048,
              ordered: bool = True) -> Iterator[tuple[list[str], list[str]]]:
    """(doc_ids, texts) of one split of a snapshot, in batches; see `iter_texts` for `ordered`.

    In order, the texts are first streamed into a scratch file beside the warehouse and then read back
    by doc_id: DuckDB's ORDER BY holds a whole split's text in memory (several times its size) and fails
    at the memory limit, while this holds about 100 bytes per document.
    """
    if not ordered:
        with connect(db_path, read_only=True) as con:
            yield from _unordered(con, snapshot_id, split, batch)
        return
    scratch_dir = Path(str(db_path) + ".tmp")
    scratch_dir.mkdir(exist_ok=True)
    with tempfile.TemporaryFile(dir=scratch_dir) as scratch:
        index = []  # (doc_id, offset, length) of each text in the scratch file
        with connect(db_path, read_only=True) as con:
            for ids, texts in _unordered(con, snapshot_id, split, batch):
                for doc, text in zip(ids, texts):
                    data = text.encode("utf-8")
                    index.append((doc, scratch.tell(), len(data)))
                    scratch.write(data)
        scratch.flush()
        index.sort()
        fd = scratch.fileno()
        for start in range(0, len(index), batch):
            part = index[start:start + batch]
            yield [d for d, _, _ in part], [os.pread(fd, n, offset).decode("utf-8") for _, offset, n in part]


def _unordered(con: duckdb.DuckDBPyConnection, snapshot_id: str, split: str,
               batch: int) -> Iterator[tuple[list[str], list[str]]]:
    """A split's (doc_ids, texts) in storage order: the join streams, nothing is sorted."""
    cur = con.execute("""SELECT d.doc_id, d.text FROM snapshot_documents s JOIN documents d USING (doc_id)
                         WHERE s.snapshot_id = ? AND s.split = ?""", [snapshot_id, split])
    while rows := cur.fetchmany(batch):
        yield [r[0] for r in rows], [r[1] for r in rows]


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
