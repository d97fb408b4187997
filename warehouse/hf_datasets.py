"""Hugging Face `datasets` as corpus sources: a folder saved with `save_to_disk`, or a hub name.

Why a module of its own: a dataset is read through the `datasets` library (memory-mapped Arrow on
disk, or a stream from the hub), not through the file dispatch of `sources.py`; but it yields the
same RawDoc / Reject items, so the warehouse accounts for it the same way: every row is a document
or a reject with a reason.

- `dataset: /path/to/folder`: a `Dataset` or a `DatasetDict` (then `split` chooses, default train)
  saved with `save_to_disk`; memory-mapped and read a batch at a time, never loaded whole.
- `dataset: owner/name` (with `subset`, the config name, and `split`): `load_dataset(...,
  streaming=True)`. Under HF_HUB_OFFLINE=1 (the default of `pretrain`) only a dataset already in the
  local datasets cache can be read; otherwise the source fails with one line saying how to fix it.

Local data files (jsonl, csv, parquet, text ...) are not read here: declare them with `path:`, which
streams them through `formats.py` with the same rejects.

Provenance: `hf:FOLDER#ROW`, `hf:FOLDER[SPLIT]#ROW` for a DatasetDict, `hf:OWNER/NAME[:SUBSET][SPLIT]#ROW`
for the hub, as a Parquet row is `FILE#ROW`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from warehouse import formats
from warehouse.formats import Bad, Doc, short
from warehouse.sources import RawDoc, Reject, SourceError, SourceSpec

BATCH_ROWS = 256  # rows decoded to Python at a time (as for Parquet): memory stays flat in the dataset size
SAVED_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
# A hub repository id: "name" or "owner/name" (letters, digits, '-', '_', '.').
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def read_dataset(spec: SourceSpec) -> Iterator[RawDoc | Reject]:
    """The documents of a dataset source (a RawDoc per row with text, a Reject per row without)."""
    rows, where = open_dataset(spec)
    for item in _rows(spec, where, rows):
        if isinstance(item, Doc):
            yield RawDoc(spec.name, item.where, item.text)
        else:
            yield Reject(spec.name, item.where, item.reason)


def open_dataset(spec: SourceSpec) -> tuple[Any, str]:
    """(a Dataset or IterableDataset, its provenance prefix); a declaration mistake raises SourceError."""
    folder = local_folder(spec.dataset)
    return _open_saved(spec, folder) if folder is not None else _open_hub(spec)


def local_folder(dataset: str) -> Path | None:
    """The folder `dataset` names, or None for a hub name. A path-like value that does not exist is an
    error (a hub name never starts with '/', '.' or '~')."""
    path = Path(dataset).expanduser()
    if os.path.lexists(path):
        return path
    if HUB_NAME.fullmatch(dataset) and ".." not in dataset:
        return None
    raise SourceError(f"dataset folder {dataset!r} does not exist; give a folder saved with save_to_disk "
                      "or a hub name like owner/name (corpus.sources[].dataset, or --dataset)")


def is_saved(folder: Path) -> bool:
    return folder.is_dir() and any((folder / marker).is_file() for marker in SAVED_MARKERS)


# -- a folder saved with save_to_disk -------------------------------------------------------------

def saved_folder(folder: Path) -> Path:
    """`folder`, if it was written by save_to_disk; a folder of data files is a `path:` source instead."""
    if not is_saved(folder):
        raise SourceError(f"{folder} is not a dataset saved with save_to_disk (no dataset_info.json, state.json or "
                          "dataset_dict.json in it); declare data files (jsonl, csv, parquet ...) as a path, not a dataset")
    return folder


def _open_saved(spec: SourceSpec, folder: Path) -> tuple[Any, str]:
    saved_folder(folder)
    import datasets

    try:  # memory-mapped: the Arrow files stay on disk, pages are read as rows are
        ds = datasets.load_from_disk(str(folder), keep_in_memory=False)
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; each is the same user error here
        raise SourceError(f"{folder} is not a readable dataset saved with save_to_disk ({short(exc)}); "
                          "save it again with save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        split = spec.split or "train"
        if split not in ds:
            raise SourceError(f"the DatasetDict at {folder} has no split {split!r} (its splits: {', '.join(ds) or 'none'}); "
                              f"set corpus.sources[].split (--split) of source {spec.name!r}")
        return ds[split], f"hf:{folder}[{split}]"
    if spec.split:
        raise SourceError(f"{folder} holds one Dataset, not a DatasetDict: it has no split {spec.split!r}; "
                          f"remove split from source {spec.name!r}")
    return ds, f"hf:{folder}"


# -- a hub name -----------------------------------------------------------------------------------

def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (read now, not at import: a caller may set it late)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def datasets_cache() -> Path:
    """The datasets cache folder as `datasets.config` computes it, from the environment of now (so that
    HF_HOME / HF_DATASETS_CACHE set after `datasets` was imported are honoured too)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "datasets"


def _cached_folder(name: str) -> Path:
    """Where `load_dataset` keeps a hub dataset it prepared: CACHE/owner___snake_name/CONFIG/VERSION/HASH."""
    from datasets.naming import camelcase_to_snakecase

    *owner, base = name.split("/")
    return datasets_cache() / "___".join([*owner, camelcase_to_snakecase(base)])


def _not_reachable(spec: SourceSpec, why: str) -> SourceError:
    split = spec.split or "train"
    args = ", ".join(repr(a) for a in (spec.dataset, spec.subset) if a)
    return SourceError(f"hub dataset {spec.dataset!r} of source {spec.name!r} is not a folder here nor in the local "
                       f"datasets cache ({datasets_cache()}), and {why}; set HF_HUB_OFFLINE=0 where the network is "
                       f"allowed, or there run load_dataset({args}, split={split!r}).save_to_disk(FOLDER) and set "
                       "dataset: to that folder")


def _open_hub(spec: SourceSpec) -> tuple[Any, str]:
    if offline() and not _cached_folder(spec.dataset).is_dir():
        raise _not_reachable(spec, "HF_HUB_OFFLINE=1 forbids downloading it")
    import datasets

    split = spec.split or "train"
    try:
        rows = datasets.load_dataset(spec.dataset, spec.subset or None, split=split, streaming=True,
                                     cache_dir=str(datasets_cache()))
    except Exception as exc:  # noqa: BLE001 - not found, gated, unknown subset or split: one line each
        if offline():  # offline, any failure is a cache miss (another subset is cached, say)
            raise _not_reachable(spec, f"HF_HUB_OFFLINE=1 forbids downloading it ({short(exc, 80)})") from None
        if isinstance(exc, ConnectionError):  # datasets' word for "no network"
            raise _not_reachable(spec, f"the hub cannot be reached ({short(exc, 80)})") from None
        raise SourceError(f"cannot read hub dataset {spec.dataset!r} of source {spec.name!r} ({short(exc)}); "
                          "check dataset, subset and split") from None
    subset = f":{spec.subset}" if spec.subset else ""
    return rows, f"hf:{spec.dataset}{subset}[{split}]"


# -- rows -----------------------------------------------------------------------------------------

def _text_column(spec: SourceSpec, where: str, rows: Any) -> tuple[str, str]:
    """(the column holding text_field, the dotted path inside it); a column that is missing or not text
    is a declaration mistake, as for a Parquet file (one error, not a reject per row)."""
    names = list(rows.column_names or [])  # a streamed dataset may not know its columns before reading
    top, _, rest = (spec.text_field, "", "") if spec.text_field in names else spec.text_field.partition(".")
    features = rows.features
    if not names or features is None:
        return top, rest
    fix = f"set corpus.sources[].text_field (--text-field) of source {spec.name!r}"
    if top not in names:
        have = ", ".join(repr(c) for c in names[:30]) + (", ..." if len(names) > 30 else "")
        raise SourceError(f"{where}: no column {spec.text_field!r} (its columns: {have}); {fix}")
    if not rest and not _is_text(features[top]):
        raise SourceError(f"{where}: column {top!r} is not text ({_describe(top, features[top])}); {fix}")
    return top, rest


def _is_text(feature: Any) -> bool:
    import datasets

    # Json: any JSON value per row; a row that is not a string is then a reject of its own.
    return (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")) \
        or type(feature).__name__ == "Json"


def _describe(column: str, feature: Any) -> str:
    if isinstance(feature, dict):  # a struct: its text is one of its fields
        return f"a struct of {', '.join(feature)}: name a field with a dotted path, e.g. {column}.{next(iter(feature), '')}"
    return getattr(feature, "dtype", None) or type(feature).__name__


def _rows(spec: SourceSpec, where: str, rows: Any) -> Iterator[Doc | Bad]:
    top, rest = _text_column(spec, where, rows)
    n = 0
    try:
        # Only the text column is decoded; `iter` reads BATCH_ROWS rows of the memory map (or stream) at a time.
        selected = rows.select_columns([top]) if rows.column_names else rows
        for batch in selected.iter(batch_size=BATCH_ROWS):
            size = len(next(iter(batch.values()), []))
            for value in batch.get(top, [None] * size):  # a streamed row may lack the column
                # formats._record: the same reasons as a JSON line or a Parquet row (no string field, too large).
                yield formats._record(spec, f"{where}#{n}", formats.field(value, rest) if rest else value)
                n += 1
    except (OSError, ValueError, pa.ArrowException) as exc:  # a damaged Arrow file, or a stream cut off part-way
        yield Bad(where, f"unreadable: {short(exc)}")
        return
    if n == 0:
        yield Bad(where, "no records (an empty dataset)")


# -- fingerprint ----------------------------------------------------------------------------------

def files(spec: SourceSpec) -> list[Path]:
    """The files a dataset source is read from: a saved folder's (Arrow data and its JSON metadata), or
    the prepared copies of a hub dataset in the local cache (none when it is streamed from the hub)."""
    folder = local_folder(spec.dataset)
    if folder is None:
        folder = _cached_folder(spec.dataset)
    elif not folder.is_dir():
        return [folder]  # not a dataset at all: the read says so; listed so that the change is seen
    return sorted(p for p in folder.rglob("*") if p.is_file())


def fingerprint(spec: SourceSpec) -> list:
    """What an ingest of the source depends on: a saved folder's files (name, size, mtime: save_to_disk
    rewrites them), or a hub dataset's cached revision (else its name, subset and split)."""
    if local_folder(spec.dataset) is not None:
        return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files(spec)]
    if offline() and not _cached_folder(spec.dataset).is_dir():
        raise _not_reachable(spec, "HF_HUB_OFFLINE=1 forbids downloading it")  # fail before a pipeline starts
    return ["hf", spec.dataset, spec.subset, spec.split or "train", _cached_revision(spec)]


def _cached_revision(spec: SourceSpec) -> list[str]:
    """The prepared copies in the datasets cache (CONFIG/VERSION/HASH; the hash follows the hub
    revision), with their info file's mtime: a newer download changes it. Empty when none is cached."""
    root = _cached_folder(spec.dataset)
    config = spec.subset or "*"
    return sorted(f"{p.relative_to(root)}@{p.stat().st_mtime_ns}" for p in root.glob(f"{config}/*/*/dataset_info.json"))
