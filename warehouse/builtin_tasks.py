"""The built-in downstream tasks, made from documents of a warehouse source.

- `stdlib-module` (any name but the ones below): which label a document carries, among the most
  frequent; for the built-in corpus, which standard-library module a docstring comes from.
- `word-order`: is this passage as written, or were its words shuffled within windows of four?
  Both classes hold the same words, so no bag of words separates them: only a model that knows how
  the language is put together does better than chance (an acceptability task in the spirit of
  CoLA). It is the task where pretraining shows, as a random-init floor stays near 50%.

A task example derived from a corpus document (a prefix, a shuffle) records that document as its
`source_doc`, and the pretraining snapshot leaves every such document out.
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

from warehouse import store

WORD_ORDER = "word-order"
ORIGINAL, SHUFFLED = "original", "shuffled"
WINDOW = 4  # words permuted together: local order broken, the passage's vocabulary kept
MIN_WORDS, MAX_WORDS = 24, 64  # a passage fits the fine-tuning max_len of 128 tokens
FRACTION = 0.35  # of the eligible documents of the source; the rest stay pretraining text


def shuffle_windows(words: list[str], window: int, rng: random.Random) -> list[str]:
    """Each run of `window` words permuted, never left as it was when it has two different words."""
    out: list[str] = []
    for i in range(0, len(words), window):
        chunk = words[i:i + window]
        if len(set(chunk)) > 1:
            shuffled = chunk[:]
            while shuffled == chunk:
                rng.shuffle(shuffled)
            chunk = shuffled
        out.extend(chunk)
    return out


def _unit(key: str, salt: str) -> float:
    return int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()[:12], 16) / 16**12


def word_order_task(db_path: str | Path, task: str, source: str, min_chars: int, val_frac: float,
                    test_frac: float) -> store.LabelTask:
    """One example per chosen document of `source`: its first words as written, or shuffled (half each)."""
    with store.connect(db_path) as con:
        rows = con.execute(
            """SELECT DISTINCT d.doc_id, d.text FROM provenance p JOIN documents d USING (doc_id)
               WHERE p.source = ? AND d.n_chars >= ? ORDER BY d.doc_id""", [source, min_chars]).fetchall()
    del con
    examples: dict[str, tuple[str, str, str]] = {}  # example id -> (text, label, source doc)
    for did, text in rows:
        words = text.split()
        if len(words) < MIN_WORDS or _unit(did, task) >= FRACTION:
            continue
        words = words[:MAX_WORDS]
        # Both classes are re-spaced the same way: a line break must not give the answer away.
        if _unit(did, f"{task}:label") < 0.5:
            label, passage = ORIGINAL, words
        else:
            label, passage = SHUFFLED, shuffle_windows(words, WINDOW, random.Random(did))
            if passage == words:
                continue
        example = " ".join(passage)
        examples.setdefault(store.doc_id(example), (example, label, did))
    if len(examples) < 10:
        raise store.WarehouseError(f"task {task!r} needs documents of at least {MIN_WORDS} words in source {source!r}; "
                                   f"found {len(examples)}: point downstream.source at a source with prose")
    ids = list(examples)
    splits = [store.assign_split(k, task, val_frac, test_frac) for k in ids]
    store.replace_task_examples(db_path, task, ids, [examples[k][0] for k in ids], [examples[k][1] for k in ids],
                                splits, source_docs=[examples[k][2] for k in ids])
    counts = {s: splits.count(s) for s in store.SPLITS}
    return store.LabelTask(task, [ORIGINAL, SHUFFLED], {"total": len(ids), **counts})


def define_builtin_task(db_path: str | Path, task: str, source: str, n_classes: int, min_chars: int,
                        val_frac: float, test_frac: float) -> store.LabelTask:
    if task == WORD_ORDER:
        return word_order_task(db_path, task, source, min_chars, val_frac, test_frac)
    return store.define_label_task(db_path, task, source, n_classes, min_chars, val_frac, test_frac)
