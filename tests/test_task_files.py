"""Downstream tasks from a user's own files (warehouse/task_files.py): formats, splits, pairs, errors."""
import csv
import json

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import write_corpus
from warehouse import store
from warehouse.sources import SourceSpec
from warehouse.task_files import TaskFileSpec, example_id, load_task_file

WORDS = "cat dog bird fish horse cow sheep goat mouse owl".split()


def _rows(n=60, n_labels=2):
    """Distinct texts; labels cycle so that every split of a hashed split sees every label."""
    return [{"text": f"example {i}: the {WORDS[i % 10]} and the {WORDS[(i * 7) % 10]} meet", "label": i % n_labels}
            for i in range(n)]


def _write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _load(tmp_path, path, task="t", val=0.2, test=0.2, **kw):
    return load_task_file(tmp_path / "w.duckdb", task, TaskFileSpec(path=str(path), **kw), val, test)


def _all(db, task):
    out = {}
    for split in store.SPLITS:
        texts, pairs, labels = store.task_split(db, task, split)
        out[split] = (texts, pairs, labels)
    return out


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "json", "parquet"])
def test_single_file_formats(tmp_path, kind):
    rows = _rows()
    rows[3]["text"] = 'a cell with a comma, a "quote"\nand a newline'
    path = tmp_path / f"data.{kind}"
    if kind == "csv":
        _write_csv(path, rows)
    elif kind == "tsv":
        _write_csv(path, rows, delimiter="\t")
    elif kind == "jsonl":
        _write_jsonl(path, rows)
    elif kind == "json":
        path.write_text(json.dumps(rows))
    else:
        _write_parquet(path, rows)
    task = _load(tmp_path, path)
    assert task.labels == ["0", "1"] and not task.pair
    assert task.counts["total"] == 60 == sum(task.counts[s] for s in store.SPLITS)
    assert all(task.counts[s] > 0 for s in store.SPLITS)
    got = _all(tmp_path / "w.duckdb", "t")
    texts = [t for s in store.SPLITS for t in got[s][0]]
    assert sorted(texts) == sorted(r["text"] for r in rows)
    assert all(got[s][1] is None for s in store.SPLITS)
    by_text = {t: lab for s in store.SPLITS for t, lab in zip(got[s][0], got[s][2])}
    assert by_text[rows[3]["text"]] == "1" and by_text[rows[4]["text"]] == "0"


def test_folder_of_split_files_mixed_formats(tmp_path):
    rows = _rows(30)
    folder = tmp_path / "task"
    folder.mkdir()
    _write_csv(folder / "train.csv", rows[:20])
    _write_jsonl(folder / "dev.jsonl", rows[20:25])
    _write_parquet(folder / "test.parquet", rows[25:])
    (folder / "README.md").write_text("ignored: not a split file")
    task = _load(tmp_path, folder)
    assert task.counts == {"total": 30, "train": 20, "validation": 5, "test": 5}
    got = _all(tmp_path / "w.duckdb", "t")
    assert sorted(got["validation"][0]) == sorted(r["text"] for r in rows[20:25])
    assert sorted(got["test"][0]) == sorted(r["text"] for r in rows[25:])


def test_folder_without_validation_carves_it_from_train(tmp_path):
    rows = _rows(60)
    folder = tmp_path / "task"
    folder.mkdir()
    _write_csv(folder / "train.csv", rows[:50])
    _write_csv(folder / "test.csv", rows[50:])
    task = _load(tmp_path, folder, val=0.2, test=0.2)
    assert task.counts["test"] == 10  # the file's test rows, none carved
    assert task.counts["validation"] > 0 and task.counts["train"] + task.counts["validation"] == 50


def test_hf_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = _rows(24)
    labels = datasets.ClassLabel(names=["neg", "pos"])

    def part(rs):
        return datasets.Dataset.from_dict({"sentence": [r["text"] for r in rs], "y": [r["label"] for r in rs]}).cast_column("y", labels)

    dd = datasets.DatasetDict({"train": part(rows[:16]), "validation": part(rows[16:20]), "test": part(rows[20:]),
                               "unsupervised": part(rows[:2])})
    dd.save_to_disk(str(tmp_path / "hf"))
    task = _load(tmp_path, tmp_path / "hf", text_column="sentence", label_column="y")
    assert task.labels == ["neg", "pos"]  # ClassLabel ids -> names
    assert task.counts == {"total": 24, "train": 16, "validation": 4, "test": 4}
    texts, pairs, names = store.task_split(tmp_path / "w.duckdb", "t", "test")
    assert sorted(texts) == sorted(r["text"] for r in rows[20:]) and pairs is None
    assert set(names) == {"neg", "pos"}

    # A single Dataset (no splits) is split by hash; an explicit format works too.
    part(rows).save_to_disk(str(tmp_path / "one"))
    one = _load(tmp_path, tmp_path / "one", task="one", format="hf-disk", text_column="sentence", label_column="y")
    assert one.counts["total"] == 24 and all(one.counts[s] > 0 for s in store.SPLITS)


def test_pair_task(tmp_path):
    rows = []
    for i in range(40):  # every premise twice, with different hypotheses: ids must not collide
        rows.append({"premise": f"premise number {i // 2} about the {WORDS[i % 10]}",
                     "hypothesis": f"hypothesis {i} says {WORDS[(i * 3) % 10]}", "label": ["yes", "no"][i % 2]})
    path = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    task = _load(tmp_path, path, text_column="premise", text_pair_column="hypothesis")
    assert task.pair and task.counts["total"] == 40 and task.n_duplicates == 0
    assert task.labels == ["no", "yes"]
    got = set()
    for split in store.SPLITS:
        texts, pairs, labels = store.task_split(tmp_path / "w.duckdb", "t", split)
        assert isinstance(pairs, list) and len(pairs) == len(texts) == len(labels)
        got |= set(zip(texts, pairs, labels))
    assert got == {(r["premise"], r["hypothesis"], r["label"]) for r in rows}
    assert example_id("a", "b") != example_id("a", "c") != example_id("a")


def test_split_column(tmp_path):
    rows = _rows(30)
    for i, r in enumerate(rows):
        r["part"] = ["train", "train", "train", "dev", "TEST"][i % 5]
    task = _load(tmp_path, _write_csv(tmp_path / "d.csv", rows), split_column="part")
    assert task.counts == {"total": 30, "train": 18, "validation": 6, "test": 6}
    texts, _, _ = store.task_split(tmp_path / "w.duckdb", "t", "validation")
    assert sorted(texts) == sorted(r["text"] for i, r in enumerate(rows) if i % 5 == 3)


def test_hash_split_is_stable_and_reload_replaces(tmp_path):
    rows = _rows(60)
    path = _write_csv(tmp_path / "d.csv", rows)
    first = _load(tmp_path, path)
    before = _all(tmp_path / "w.duckdb", "t")
    again = _load(tmp_path, path)
    assert again.counts == first.counts and _all(tmp_path / "w.duckdb", "t") == before
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM task_examples WHERE task = 't'").fetchone()[0] == 60
        n_docs = con.execute("SELECT count(*) FROM documents").fetchone()[0]
    assert n_docs == 60
    # A fresh warehouse gives the same splits (the hash depends on the example and the task name only).
    load_task_file(tmp_path / "other.duckdb", "t", TaskFileSpec(path=str(path)), 0.2, 0.2)
    assert _all(tmp_path / "other.duckdb", "t") == before
    # Re-loading from a smaller file replaces the rows; a growing file keeps old examples in their split.
    _write_csv(path, rows[:40])
    smaller = _load(tmp_path, path)
    assert smaller.counts["total"] == 40
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM task_examples WHERE task = 't'").fetchone()[0] == 40
    for split in store.SPLITS:
        assert set(store.task_split(tmp_path / "w.duckdb", "t", split)[0]) <= set(before[split][0])


def test_rejected_rows_and_duplicates_are_counted(tmp_path):
    rows = _rows(40)
    lines = [json.dumps(r) for r in rows]
    lines += [json.dumps({"text": None, "label": 1}), json.dumps({"text": "   ", "label": 0}),
              json.dumps({"label": 0}), json.dumps({"text": "no label here at all", "label": None}),
              json.dumps(rows[0]), json.dumps({**rows[1], "label": 0}), ""]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines))
    task = _load(tmp_path, path)
    assert task.counts["total"] == 40 and task.n_rejected == 4 and task.n_duplicates == 2


def test_task_documents_are_left_out_of_pretraining(tmp_path):
    db = tmp_path / "w.duckdb"
    corpus = write_corpus(tmp_path / "corpus", 12)
    single = "a downstream sentence that also sits in the pretraining corpus, word for word."
    premise = "a premise of the pair task that also appears in the pretraining corpus as is."
    hypothesis = "the hypothesis of that pair, copied into the pretraining corpus as well, too."
    for i, text in enumerate((single, premise, hypothesis)):
        (corpus / f"leak{i}.txt").write_text(text + "\n")
    store.ingest(db, [SourceSpec(name="c", path=str(corpus))])

    def snapshot_texts():
        snap = store.create_snapshot(db, "c", ["c"], 0.1, 0.1)
        return {t for s in store.SPLITS for batch in store.iter_texts(db, snap.snapshot_id, s) for t in batch}

    assert {single, premise, hypothesis} <= snapshot_texts()
    rows = _rows(30)
    rows[0]["text"] = "  " + single  # cleaned like the corpus: same content hash
    load_task_file(db, "single", TaskFileSpec(path=str(_write_csv(tmp_path / "s.csv", rows))), 0.2, 0.2)
    pairs = [{"a": r["text"], "b": f"pair {i}", "label": r["label"]} for i, r in enumerate(_rows(30))]
    pairs[0].update(a=premise, b=hypothesis)
    load_task_file(db, "pair", TaskFileSpec(path=str(_write_csv(tmp_path / "p.csv", pairs)), text_column="a",
                                            text_pair_column="b"), 0.2, 0.2)
    left = snapshot_texts()
    assert not {single, premise, hypothesis} & left
    assert len(left) == 12  # the rest of the corpus is still there


def test_old_warehouse_is_migrated(tmp_path):
    db = tmp_path / "old.duckdb"
    with duckdb.connect(str(db)) as con:  # the schema before text_pair, with one built-in-style task
        con.execute("CREATE TABLE documents (doc_id VARCHAR PRIMARY KEY, text VARCHAR NOT NULL, "
                    "n_chars INTEGER NOT NULL, first_seen TIMESTAMP)")
        con.execute("CREATE TABLE task_examples (task VARCHAR, doc_id VARCHAR, label VARCHAR, split VARCHAR, "
                    "PRIMARY KEY (task, doc_id))")
        con.execute("INSERT INTO documents VALUES (?, 'old text', 8, NULL)", [store.doc_id("old text")])
        con.execute("INSERT INTO task_examples VALUES ('old', ?, 'x', 'train')", [store.doc_id("old text")])
    assert store.task_split(db, "old", "train") == (["old text"], None, ["x"])  # read-only: not migrated yet
    load_task_file(db, "new", TaskFileSpec(path=str(_write_csv(tmp_path / "d.csv", _rows(30)))), 0.2, 0.2)
    assert store.task_split(db, "old", "train") == (["old text"], None, ["x"])


def _bad(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, list):
        _write_csv(path, content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _no_train(tmp_path):
    folder = tmp_path / "splits"
    folder.mkdir()
    _write_csv(folder / "test.csv", _rows())
    return folder


def _folder(tmp_path, train, validation, test):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, rows in (("train", train), ("validation", validation), ("test", test)):
        if rows:
            _write_csv(folder / f"{name}.csv", rows)
        else:
            (folder / f"{name}.csv").write_text("text,label\n")
    return folder


BAD = {
    "missing path": (lambda p: p / "nope.csv", {}, ["does not exist", "downstream.path"]),
    "unknown extension": (lambda p: _bad(p, "d.xlsx", "x"), {}, ["cannot tell the format", "csv", "hf-disk",
                                                                  "downstream.format"]),
    "unknown format": (lambda p: _bad(p, "d.csv", "text,label\n"), {"format": "excel"},
                       ["unknown task file format", "downstream.format", "parquet"]),
    "bad json line": (lambda p: _bad(p, "bad.jsonl", '{"text": "a", "label": 1}\n{"text": oops}\n'), {},
                      ["bad.jsonl", "line 2", "invalid JSON"]),
    "bad json": (lambda p: _bad(p, "bad.json", '[{"text": "a", "label": 1},\n {"text": '), {},
                 ["bad.json", "invalid JSON"]),
    "ragged csv": (lambda p: _bad(p, "bad.csv", "text,label\na,1\nb,0,extra\n"), {},
                   ["bad.csv", "line 3", "malformed CSV", "3 fields"]),
    "not parquet": (lambda p: _bad(p, "bad.parquet", "not parquet at all"), {}, ["bad.parquet", "Parquet"]),
    "not utf-8": (lambda p: _bad(p, "latin.csv", "text,label\ncaf\xe9,1\n".encode("latin-1")), {},
                  ["latin.csv", "UTF-8"]),
    "missing text column": (lambda p: _bad(p, "d.csv", _rows()), {"text_column": "sentence"},
                            ["'sentence'", "its columns: 'text', 'label'", "downstream.text_column"]),
    "missing pair column": (lambda p: _bad(p, "d.csv", _rows()), {"text_pair_column": "hyp"},
                            ["'hyp'", "downstream.text_pair_column"]),
    "missing label column": (lambda p: _bad(p, "d.csv", _rows()), {"label_column": "y"},
                             ["'y'", "downstream.label_column"]),
    "unseen label": (lambda p: _folder(p, _rows(28)[:20], _rows(28)[20:24] + [{"text": "new", "label": 7}], _rows(28)[24:]), {},
                     ["'7'", "validation", "not in train"]),
    "empty split": (lambda p: _folder(p, _rows(24)[:20], _rows(24)[20:], []), {}, ["empty test split", "val_frac"]),
    "no train file": (_no_train, {}, ["no train file", "test.csv"]),
    "one label": (lambda p: _bad(p, "d.csv", _rows(30, n_labels=1)), {}, ["1 label", "at least 2", "label_column"]),
    "bad split value": (lambda p: _bad(p, "d.csv", [{**r, "s": "holdout"} for r in _rows()]), {"split_column": "s"},
                        ["'holdout'", "downstream.split_column"]),
    "hf-disk on a file": (lambda p: _bad(p, "d.csv", _rows()), {"format": "hf-disk"}, ["save_to_disk"]),
    "empty folder": (lambda p: (p / "empty").mkdir() or p / "empty", {}, ["no per-split files", "downstream.path"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_line(tmp_path, case):
    make, kw, words = BAD[case]
    path = make(tmp_path)
    with pytest.raises(store.WarehouseError) as info:
        _load(tmp_path, path, **kw)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_bad_input_leaves_the_previous_task_in_place(tmp_path):
    good = _load(tmp_path, _write_csv(tmp_path / "d.csv", _rows()))
    with pytest.raises(store.WarehouseError):
        _load(tmp_path, _bad(tmp_path, "bad.jsonl", '{"text": oops}\n'))
    assert sum(len(store.task_split(tmp_path / "w.duckdb", "t", s)[0]) for s in store.SPLITS) == good.counts["total"]
