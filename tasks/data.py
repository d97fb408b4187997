"""Prefect tasks over the warehouse: ingest, downstream task, snapshot, tokenizer, shards, examples."""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
from prefect import task

from model.config import TrainConfig, load_dataclass
from model.data import WORD_STARTS_FILE, save_rows, word_starts
from model.objectives import get_objective
from tasks.caching import EVALUATION_ONLY, retry_on_io, stage_cache_key
from warehouse import store
from warehouse.builtin_tasks import define_builtin_task
from warehouse.contamination import snapshot_contamination
from warehouse.dedup import NearDupConfig
from warehouse.quality import QualityConfig
from warehouse.shards import load_split, write_token_shards
from warehouse.sources import SourceSpec, expand
from warehouse.task_files import TaskFileSpec, load_task_file
from warehouse.tokenizer import TokenizerConfig, train_tokenizer

CACHED = dict(persist_result=True, result_serializer="json")


def source_fingerprint(specs: list[dict]) -> list:
    """What an ingest depends on: every input file's path, size and mtime (the interpreter for built-ins;
    for a Hugging Face dataset, hf_datasets.fingerprint)."""
    import sys

    out = []
    for spec in specs:
        s = SourceSpec(**spec)
        if s.builtin:
            out.append([s.builtin, sys.version])
        elif s.dataset:
            from warehouse.hf_datasets import fingerprint

            out.append(fingerprint(s))
        else:
            out.append([_stat(p) for p in expand(s)])
    return out


def _stat(path: Path) -> list:
    try:
        st = path.stat()
    except OSError:  # a broken link or a loop: fingerprinted by the link itself (the ingest rejects it)
        st = path.lstat()
    return [str(path), st.st_size, st.st_mtime_ns]


@task(name="ingest", cache_key_fn=stage_cache_key("warehouse", skip=EVALUATION_ONLY), retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_on_io, **CACHED)
def ingest_corpus(db_path: str, sources: list[dict], min_chars: int, quality: dict, fingerprint: list) -> dict:
    report = store.ingest(db_path, [SourceSpec(**s) for s in sources], min_chars, quality=QualityConfig(**quality))
    return {**asdict(report), "outputs": [db_path]}


@task(name="downstream-task", cache_key_fn=stage_cache_key("warehouse", skip=EVALUATION_ONLY), **CACHED)
def define_downstream_task(db_path: str, task_name: str, source: str, n_classes: int, min_chars: int,
                           val_frac: float, test_frac: float, ingest_key: str) -> dict:
    t = define_builtin_task(db_path, task_name, source, n_classes, min_chars, val_frac, test_frac)
    return {**asdict(t), "outputs": [db_path]}


@task(name="downstream-task-file", cache_key_fn=stage_cache_key("warehouse"), retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_on_io, **CACHED)
def load_downstream_file(db_path: str, task_name: str, spec: dict, val_frac: float, test_frac: float,
                         fingerprint: list, ingest_key: str) -> dict:
    """A user's labelled file (or folder, or saved HF dataset) as a task; its texts leave the snapshot."""
    t = load_task_file(db_path, task_name, TaskFileSpec(**spec), val_frac, test_frac)
    return {**asdict(t), "outputs": [db_path]}


def task_file_fingerprint(spec: dict) -> list:
    """A task file's (or folder's files') paths, sizes and mtimes: a changed file re-loads the task."""
    path = Path(spec["path"]).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [_stat(p) for p in files if p.exists()]


@task(name="contamination", cache_key_fn=stage_cache_key("warehouse"), **CACHED)
def check_contamination(db_path: str, snapshot_id: str, task_name: str, n: int, task_key: str) -> dict:
    """Word n-gram overlap of the task's evaluation splits with the pretraining snapshot."""
    examples = {}
    for split in ("validation", "test"):
        texts, pairs, _ = store.task_split(db_path, task_name, split)
        # One example, one score: a pair is judged as its two texts together.
        examples[split] = texts if pairs is None else [f"{t}\n{p}" for t, p in zip(texts, pairs)]
    found = snapshot_contamination(db_path, snapshot_id, examples, n=n)
    return {split: asdict(c) for split, c in found.items()}


@task(name="snapshot", cache_key_fn=stage_cache_key("warehouse", skip=EVALUATION_ONLY), **CACHED)
def snapshot_corpus(db_path: str, name: str, sources: list[str], val_frac: float, test_frac: float,
                    near_dup: dict, upstream_key: str) -> dict:
    info = store.create_snapshot(db_path, name, sources, val_frac, test_frac, NearDupConfig(**near_dup))
    return {**asdict(info), "outputs": [db_path]}


@task(name="tokenizer", cache_key_fn=stage_cache_key("warehouse", skip=EVALUATION_ONLY), **CACHED)
def tokenizer_for(db_path: str, snapshot_id: str, config: dict, out_path: str) -> dict:
    info = train_tokenizer(db_path, snapshot_id, TokenizerConfig(**config), out_path)
    return {**info, "path": out_path, "outputs": [out_path]}


@task(name="token-shards", cache_key_fn=stage_cache_key("warehouse", skip=EVALUATION_ONLY), retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_on_io, **CACHED)
def tokenize_snapshot(db_path: str, snapshot_id: str, tokenizer_path: str, out_dir: str) -> dict:
    counts = write_token_shards(db_path, snapshot_id, tokenizer_path, out_dir)
    return {"splits": counts, "dir": out_dir, "outputs": [os.path.join(out_dir, "meta.json")]}


@task(name="examples", cache_key_fn=stage_cache_key("model", "warehouse", skip=EVALUATION_ONLY), **CACHED)
def make_examples(train_config: dict, shard_dir: str, tokenizer_path: str, out_dir: str) -> dict:
    """The objective's example maker over each split's token stream, written as memory-mappable rows.

    `train_config` holds only the keys example makers read (model.objectives.EXAMPLE_KEYS) and the
    specials, so a change of learning rate reuses the examples.
    """
    cfg = load_dataclass(TrainConfig, train_config)
    maker = get_objective(cfg.objective).make_examples
    starts = word_starts(tokenizer_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / WORD_STARTS_FILE, starts)
    counts = {}
    for split in store.SPLITS:
        tokens, offsets = load_split(shard_dir, split)
        rows = maker(tokens, offsets, cfg, cfg.specials, starts)
        save_rows(out / f"{split}.npy", rows)
        counts[split] = int(len(rows))
    sample = decode_sample(tokenizer_path, rows)
    (out / "meta.json").write_text(json.dumps({"objective": cfg.objective, "seq_len": cfg.seq_len, "rows": counts,
                                               "row_width": int(rows.shape[1]), "sample": sample}))
    return {"rows": counts, "dir": out_dir, "row_width": int(rows.shape[1]), "sample": sample,
            "outputs": [str(out / f"{s}.npy") for s in store.SPLITS]}


def decode_sample(tokenizer_path: str, rows) -> str:
    """The first example row as text (special tokens kept), for a human to check what the model sees."""
    from tokenizers import Tokenizer

    if not len(rows):
        return ""
    return Tokenizer.from_file(tokenizer_path).decode([int(i) for i in rows[0]], skip_special_tokens=False)
