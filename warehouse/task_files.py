"""Downstream classification tasks from a user's own files: single-text or text-pair.

Inputs: one CSV / TSV / JSON lines / JSON / Parquet file (optionally .gz for the text formats); a
folder of per-split files (train*, validation* | valid* | dev* | val*, test*, several shards per
split allowed); or a Hugging Face Dataset / DatasetDict written by `save_to_disk`.

Splits, first that applies: the per-split files or DatasetDict splits; else `split_column`; else a
hash of the example's id (`store.assign_split`, salted with the task name, so stable across loads
and as the file grows). When explicit splits leave out validation or test, the missing ones are
carved from train by that same hash (with val_frac / test_frac); train itself must be present.

Storage. An example's text goes into `documents` (so that `create_snapshot` leaves it out of
pretraining and a contamination check can read it) and its row into `task_examples`.
Texts are cleaned with `sources.normalize`, as the ingest cleans corpus documents, so a task text
and the same text in the corpus get the same content hash.
 - Single-text example: doc_id = store.doc_id(text), the id the same document has in the corpus.
 - Text-pair example: doc_id = store.doc_id(text + "\\x1f" + text_pair); documents.text holds the
   first text and task_examples.text_pair the second. `normalize` removes every control character,
   so no cleaned text contains the separator U+001F: the joined string decodes to exactly one
   (text, pair), two examples with the same text but different pairs never collide, and a pair id is
   never the id of a plain document. `create_snapshot` also leaves out corpus documents whose content
   hash is that of a pair example's first or second text.
Rows of the task are replaced in one transaction (DELETE + INSERT), as `define_label_task` does; an
example seen twice (same id) keeps its first occurrence (train files are read first), the others are
counted in `LabelTask.n_duplicates`. Rows with an empty or missing text, pair, label or split value
are counted in `LabelTask.n_rejected`.

Labels are stored as strings: 0 -> "0", 1.0 -> "1", true -> "true"; a Hugging Face ClassLabel
column gives its class names.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa

from warehouse import store
from warehouse.sources import normalize

FORMATS = ("csv", "tsv", "jsonl", "json", "parquet", "hf-disk")
EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
              ".parquet": "parquet", ".pq": "parquet"}
SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation",
               "val": "validation", "test": "test"}
KEY = "downstream."  # the config section whose keys the error messages name
PAIR_SEPARATOR = "\x1f"  # see the module docstring: never inside a normalized text
_SPLIT_FILE = re.compile(r"^(train|validation|valid|dev|val|test)(?=[-_.]|$)", re.IGNORECASE)
_WHAT = {"text_column": "text", "text_pair_column": "second text", "label_column": "label",
         "split_column": "split name"}


@dataclass
class TaskFileSpec:
    path: str  # a file, a folder of per-split files, or a `save_to_disk` folder
    format: str = "auto"  # auto | csv | tsv | jsonl | json | parquet | hf-disk
    text_column: str = "text"
    text_pair_column: str = ""  # empty: a single-text task
    label_column: str = "label"
    split_column: str = ""  # optional: a column holding train / validation / test


def _error(message: str) -> store.WarehouseError:
    """A one-line error (messages quoted from parsers may hold newlines)."""
    return store.WarehouseError(" ".join(message.split()))


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


# -- reading: every reader yields dicts {config key: cell value} ---------------------------------

Wanted = list[tuple[str, str]]  # (config key, column name) of the columns to read


def _check_columns(where: str, columns: list[str], wanted: Wanted) -> None:
    for key, column in wanted:
        if column not in columns:
            have = ", ".join(repr(c) for c in columns[:30]) + (", ..." if len(columns) > 30 else "") or "none"
            raise _error(f"{where} has no column {column!r} (its columns: {have}); set {KEY}{key} to the column "
                         f"holding the {_WHAT[key]}")


def _detect(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    fmt = EXTENSIONS.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        ext = "".join(path.suffixes[-2:]) or "no extension"
        raise _error(f"cannot tell the format of {path} ({ext}); supported: {', '.join(FORMATS)} (extensions "
                     f"{' '.join(EXTENSIONS)}); rename the file or set {KEY}format")
    return fmt


def _read_text(path: Path) -> str:
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix.lower() == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise _error(f"cannot read {path}: {_short(exc)}; check the file") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _error(f"{path} is not UTF-8 text (bad byte at offset {exc.start}); re-save it as UTF-8") from None


def _read_delimited(path: Path, fmt: str, wanted: Wanted) -> Iterator[dict]:
    text = _read_text(path)
    before = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # long documents in one cell
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="," if fmt == "csv" else "\t")
        rows = []
        try:
            header = next(reader, None)
            if header is None:
                raise _error(f"{path} is empty; it needs a header row naming its columns")
            for row in reader:
                if not row:
                    continue  # a blank line
                if len(row) != len(header):
                    raise _error(f"{path} line {reader.line_num}: malformed {fmt.upper()}, {len(row)} fields where "
                                 f"the header has {len(header)}; quote cells that contain the delimiter or a newline")
                rows.append(row)
        except csv.Error as exc:
            raise _error(f"{path} line {reader.line_num}: malformed {fmt.upper()} ({_short(exc)}); fix the quoting") from None
    finally:
        csv.field_size_limit(before)
    header = [h.strip() for h in header]
    _check_columns(str(path), header, wanted)
    index = [(key, header.index(column)) for key, column in wanted]
    for row in rows:
        yield {key: row[i] for key, i in index}


def _read_jsonl_text(path: Path, text: str) -> list[dict]:
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _error(f"{path} line {lineno} column {exc.colno}: invalid JSON ({exc.msg}); fix or remove that line") from None
        except RecursionError:
            raise _error(f"{path} line {lineno}: invalid JSON (nested too deeply); fix or remove that line") from None
        if not isinstance(obj, dict):
            raise _error(f"{path} line {lineno}: a JSON {type(obj).__name__}, not an object; each line must be "
                         "one object such as {\"text\": ..., \"label\": ...}")
        records.append(obj)
    return records


def _read_json_records(path: Path, fmt: str) -> list[dict]:
    text = _read_text(path)
    if fmt == "jsonl":
        return _read_jsonl_text(path, text)
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        first = next((line for line in text.splitlines() if line.strip()), "")
        try:  # JSON lines under a .json name (what `Dataset.to_json` writes)
            lines = isinstance(json.loads(first), dict)
        except (json.JSONDecodeError, RecursionError):
            lines = False
        if lines:
            return _read_jsonl_text(path, text)
        if isinstance(exc, json.JSONDecodeError):
            raise _error(f"{path} line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg}); fix the file") from None
        raise _error(f"{path}: invalid JSON (nested too deeply); fix the file") from None
    if isinstance(obj, dict):
        lists = {k: v for k, v in obj.items() if isinstance(v, list)}
        if len(lists) == 1 and all(isinstance(r, dict) for r in next(iter(lists.values()))):
            obj = next(iter(lists.values()))  # {"data": [{...}, ...]}
        elif lists and len(lists) == len(obj) and len({len(v) for v in lists.values()}) == 1:
            obj = [dict(zip(lists, values)) for values in zip(*lists.values())]  # {"text": [...], "label": [...]}
        elif not lists:
            obj = [obj]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise _error(f"{path}: expected a JSON list of objects (or JSON lines, one object per line); "
                     "write the file as [{\"text\": ..., \"label\": ...}, ...]")
    return obj


def _read_json(path: Path, fmt: str, wanted: Wanted) -> Iterator[dict]:
    records = _read_json_records(path, fmt)
    seen: dict[str, None] = {}
    for r in records:
        seen.update(dict.fromkeys(r))
    _check_columns(str(path), list(seen), wanted)
    for r in records:
        yield {key: r.get(column) for key, column in wanted}


def _read_parquet(path: Path, wanted: Wanted) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise _error(f"{path} is not a readable Parquet file ({_short(exc)}); check the file or set {KEY}format") from None
    _check_columns(str(path), list(pf.schema_arrow.names), wanted)
    columns = list(dict.fromkeys(column for _, column in wanted))
    try:
        for batch in pf.iter_batches(batch_size=4096, columns=columns):
            values = {c: batch.column(c).to_pylist() for c in columns}
            for i in range(batch.num_rows):
                yield {key: values[column][i] for key, column in wanted}
    except (pa.ArrowException, OSError) as exc:
        raise _error(f"{path}: damaged Parquet data ({_short(exc)}); re-write the file") from None


def _read_file(path: Path, fmt: str, wanted: Wanted) -> Iterator[dict]:
    if fmt in ("csv", "tsv"):
        return _read_delimited(path, fmt, wanted)
    if fmt in ("jsonl", "json"):
        return _read_json(path, fmt, wanted)
    return _read_parquet(path, wanted)


def _read_hf(dataset: Any, where: str, wanted: Wanted) -> Iterator[dict]:
    import datasets

    _check_columns(where, list(dataset.column_names), wanted)
    names = {key: dataset.features[column].names for key, column in wanted
             if isinstance(dataset.features[column], datasets.ClassLabel)}
    columns = list(dict.fromkeys(column for _, column in wanted))
    for batch in dataset.select_columns(columns).iter(batch_size=1024):
        for i in range(len(batch[columns[0]])):
            row = {key: batch[column][i] for key, column in wanted}
            for key, classes in names.items():  # ClassLabel ids -> class names; -1 (no label) -> missing
                v = row[key]
                row[key] = classes[v] if isinstance(v, int) and 0 <= v < len(classes) else None
            yield row


# -- which parts make up the task ----------------------------------------------------------------

@dataclass
class _Part:
    split: str | None  # None: no split from the file layout
    where: str  # for messages
    read: Callable[[Wanted], Iterator[dict]]


def _is_hf_disk(folder: Path) -> bool:
    return ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()
            or ((folder / "dataset_info.json").is_file() and any(folder.glob("*.arrow"))))


def _hf_parts(folder: Path) -> list[_Part]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; each is the same user error here
        raise _error(f"{folder} is not a readable Hugging Face dataset saved with save_to_disk ({_short(exc)}); "
                     f"re-save it or set {KEY}format") from None
    if isinstance(ds, datasets.DatasetDict):
        parts = [_Part(SPLIT_NAMES[name.lower()], f"{folder} split {name!r}", lambda w, d=d, n=name: _read_hf(d, f"{folder} split {n!r}", w))
                 for name, d in ds.items() if name.lower() in SPLIT_NAMES]
        if not any(p.split == "train" for p in parts):
            raise _error(f"the DatasetDict at {folder} has no train split (its splits: {', '.join(ds) or 'none'}); "
                         "name the training split 'train'")
        return parts
    if not isinstance(ds, datasets.Dataset):
        raise _error(f"{folder} holds a {type(ds).__name__}, not a Dataset or DatasetDict; re-save it with save_to_disk")
    return [_Part(None, str(folder), lambda w: _read_hf(ds, str(folder), w))]


def _parts(spec: TaskFileSpec) -> list[_Part]:
    fmt = (spec.format or "auto").strip().lower()
    if fmt not in ("auto", *FORMATS):
        raise _error(f"unknown task file format {spec.format!r}; set {KEY}format to one of auto, {', '.join(FORMATS)}")
    if not spec.path:
        raise _error(f"no task file given; set {KEY}path to a file or folder")
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise _error(f"task file {spec.path!r} does not exist; fix {KEY}path")
    if path.is_dir():
        if fmt == "hf-disk" or (fmt == "auto" and _is_hf_disk(path)):
            return _hf_parts(path)
        parts = []
        for child in sorted(path.iterdir()):
            m = _SPLIT_FILE.match(child.name)
            if m is None or not child.is_file():
                continue
            child_fmt = fmt if fmt != "auto" else _detect(child)
            parts.append(_Part(SPLIT_NAMES[m.group(1).lower()], str(child),
                               lambda w, c=child, f=child_fmt: _read_file(c, f, w)))
        if not parts:
            raise _error(f"folder {path} holds no per-split files and no save_to_disk dataset; name the files train / "
                         f"validation / test with an extension of {' '.join(EXTENSIONS)}, or point {KEY}path at one file")
        if not any(p.split == "train" for p in parts):
            found = ", ".join(sorted({Path(p.where).name for p in parts}))
            raise _error(f"folder {path} has no train file (found {found}); add train.<ext> beside them")
        return parts
    if fmt == "hf-disk":
        raise _error(f"{path} is a file, but format hf-disk needs the folder written by save_to_disk; fix {KEY}path "
                     f"or {KEY}format")
    file_fmt = fmt if fmt != "auto" else _detect(path)
    return [_Part(None, str(path), lambda w: _read_file(path, file_fmt, w))]


# -- cells ----------------------------------------------------------------------------------------

def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(value: Any, where: str, key: str, column: str) -> str | None:
    if _missing(value):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise _error(f"{where}: column {column!r} holds {type(value).__name__} values, not text; set {KEY}{key} "
                     f"to the column holding the {_WHAT[key]}")
    return normalize(value) or None


def _label(value: Any, where: str) -> str | None:
    if _missing(value):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value.strip() or None
    raise _error(f"{where}: a label is a {type(value).__name__}, not a single value; only single-label "
                 f"classification is supported, set {KEY}label_column to a column of labels")


def _split_value(value: Any, where: str, column: str) -> str | None:
    if _missing(value) or (isinstance(value, str) and not value.strip()):
        return None
    split = SPLIT_NAMES.get(str(value).strip().lower())
    if split is None:
        raise _error(f"{where}: split value {value!r} in column {column!r} is not one of train / validation / test "
                     f"(or valid, dev, val); fix the values or unset {KEY}split_column")
    return split


def example_id(text: str, text_pair: str | None = None) -> str:
    """A single text's content hash, or the hash of both texts of a pair (see the module docstring)."""
    return store.doc_id(text if text_pair is None else text + PAIR_SEPARATOR + text_pair)


# -- the task -------------------------------------------------------------------------------------

def load_task_file(db_path: str | Path, task: str, spec: TaskFileSpec, val_frac: float,
                   test_frac: float) -> store.LabelTask:
    """Read a user's labelled file(s) into the warehouse as downstream task `task` (its rows replaced)."""
    parts = _parts(spec)
    pair = bool(spec.text_pair_column)
    by_layout = any(p.split is not None for p in parts)
    wanted: Wanted = [("text_column", spec.text_column), ("label_column", spec.label_column)]
    if pair:
        wanted.append(("text_pair_column", spec.text_pair_column))
    if spec.split_column and not by_layout:
        wanted.append(("split_column", spec.split_column))
    order = {s: i for i, s in enumerate(store.SPLITS)}
    parts.sort(key=lambda p: order.get(p.split, -1))  # train first: a repeat in a held-out split is the one dropped

    examples: dict[str, tuple[str | None, str, str | None, str]] = {}  # id -> (split, text, pair, label)
    rejected = duplicates = 0
    explicit = {p.split for p in parts if p.split is not None}  # splits the input names (files, DatasetDict, column)
    for part in parts:
        for row in part.read(wanted):
            text = _text(row["text_column"], part.where, "text_column", spec.text_column)
            second = (_text(row["text_pair_column"], part.where, "text_pair_column", spec.text_pair_column)
                      if pair else None)
            label = _label(row["label_column"], part.where)
            split = part.split
            if "split_column" in row:
                split = _split_value(row["split_column"], part.where, spec.split_column)
                explicit.add(split)
                if split is None:
                    rejected += 1
                    continue
            if text is None or label is None or (pair and second is None):
                rejected += 1
                continue
            key = example_id(text, second)
            if key in examples:
                duplicates += 1
                continue
            examples[key] = (split, text, second, label)

    explicit.discard(None)
    if explicit and "train" not in explicit:  # (a layout without train was refused by _parts)
        raise _error(f"task {task!r}: no row of {spec.path} has train in column {spec.split_column!r} (found "
                     f"{', '.join(sorted(explicit))}); add training rows or unset {KEY}split_column")
    rows = []
    for key, (split, text, second, label) in examples.items():
        if split is None or split == "train":  # hashed; with explicit splits, only the missing ones are carved
            carved = store.assign_split(key, task, val_frac, test_frac)
            split = carved if carved not in explicit else "train"
        rows.append((key, split, text, second, label))

    counts = {s: sum(1 for r in rows if r[1] == s) for s in store.SPLITS}
    skipped = f" ({rejected} rows were rejected for an empty text, pair, label or split)" if rejected else ""
    for s in store.SPLITS:
        if counts[s] == 0:
            raise _error(f"task {task!r} has an empty {s} split{skipped}; add {s} rows to {spec.path} or change "
                         f"{KEY}val_frac / {KEY}test_frac")
    labels = sorted({r[4] for r in rows if r[1] == "train"})
    if len(labels) < 2:
        raise _error(f"task {task!r} has {len(labels)} label(s) in its train split ({', '.join(map(repr, labels))}); "
                     f"a classification task needs at least 2: check {KEY}label_column")
    known = set(labels)
    for s in ("validation", "test"):
        unseen = sorted({r[4] for r in rows if r[1] == s} - known)
        if unseen:
            more = f" (and {len(unseen) - 1} more)" if len(unseen) > 1 else ""
            raise _error(f"task {task!r}: label {unseen[0]!r}{more} occurs in the {s} split but not in train; add "
                         f"train rows with that label or drop those {s} rows")

    store.replace_task_examples(db_path, task, [r[0] for r in rows], [r[2] for r in rows], [r[4] for r in rows],
                                [r[1] for r in rows], text_pairs=[r[3] for r in rows])
    return store.LabelTask(task, labels, {"total": len(rows), **counts}, pair=pair, n_duplicates=duplicates,
                           n_rejected=rejected)
