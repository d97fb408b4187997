import random

import duckdb
import pytest

from tests.conftest import write_corpus
from warehouse import store
from warehouse.builtin_tasks import MAX_WORDS, WORD_ORDER, define_builtin_task, shuffle_windows
from warehouse.dedup import NearDupConfig
from warehouse.quality import QualityConfig
from warehouse.shards import load_split, write_token_shards
from warehouse.sources import SourceError, SourceSpec
from warehouse.tokenizer import TokenizerConfig, train_tokenizer


def _counts(db):
    with duckdb.connect(str(db), read_only=True) as con:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("documents", "provenance", "rejects")}


def test_every_input_is_a_document_or_a_reject(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", 30)
    (corpus / "binary.txt").write_bytes(b"\x00\x01\x02 not text")
    (corpus / "latin1.txt").write_bytes("caf\xe9 ol\xe9".encode("latin-1") * 20)
    (corpus / "empty.md").write_text("   \n")
    (corpus / "short.txt").write_text("tiny")
    (corpus / "image.png").write_bytes(b"\x89PNG")
    with open(corpus / "docs.jsonl", "a") as f:
        f.write("{not json\n")
        f.write('{"other": "field"}\n')
    db = tmp_path / "w.duckdb"
    report = store.ingest(db, [SourceSpec(name="c", path=str(corpus))], min_chars=32)
    assert report.n_inputs == 30 + 7
    assert report.n_documents == 30
    assert report.n_documents + report.n_rejects == report.n_inputs
    with duckdb.connect(str(db), read_only=True) as con:
        reasons = dict(con.execute("SELECT path, reason FROM rejects").fetchall())
    by_name = {k.rsplit("/", 1)[-1]: v for k, v in reasons.items()}
    assert by_name["binary.txt"].startswith("binary content")
    assert by_name["latin1.txt"].startswith("undecodable as UTF-8")
    assert by_name["empty.md"] == "empty after cleaning"
    assert by_name["short.txt"].startswith("too short")
    assert by_name["image.png"].startswith("unsupported format")
    assert any(v.startswith("malformed JSON") for v in by_name.values())
    assert any(v == "no string field 'text'" for v in by_name.values())


def test_reingest_is_idempotent_and_snapshot_stable(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", 40)
    db = tmp_path / "w.duckdb"
    spec = [SourceSpec(name="c", path=str(corpus))]
    store.ingest(db, spec)
    first = store.create_snapshot(db, "c", ["c"], 0.1, 0.1)
    counts = _counts(db)
    again = store.ingest(db, spec)
    assert again.n_new == 0 and _counts(db) == counts
    assert store.create_snapshot(db, "c", ["c"], 0.1, 0.1).snapshot_id == first.snapshot_id

    (corpus / "extra.txt").write_text("a brand new document about attention masks and tokens. " * 3)
    assert store.ingest(db, spec).n_new == 1
    second = store.create_snapshot(db, "c", ["c"], 0.1, 0.1)
    assert second.snapshot_id != first.snapshot_id
    with duckdb.connect(str(db), read_only=True) as con:
        def splits(sid):
            return dict(con.execute("SELECT doc_id, split FROM snapshot_documents WHERE snapshot_id = ?", [sid]).fetchall())
        old, new = splits(first.snapshot_id), splits(second.snapshot_id)
    assert all(new[d] == s for d, s in old.items()), "a document changed split when the corpus grew"
    assert set(first.splits) == {"train", "validation", "test"}


def test_missing_path_and_empty_corpus_are_clear(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        store.ingest(tmp_path / "w.duckdb", [SourceSpec(name="c", path=str(tmp_path / "nope"))])
    with pytest.raises(SourceError, match="matches no files"):
        store.ingest(tmp_path / "w.duckdb", [SourceSpec(name="c", path=str(tmp_path / "*.txt"))])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(store.WarehouseError, match="the corpus is empty"):
        store.ingest(tmp_path / "w.duckdb", [SourceSpec(name="c", path=str(tmp_path / "empty"))])


def test_second_writer_is_refused_clearly(tmp_path):
    db = tmp_path / "w.duckdb"
    with store.connect(db):
        import subprocess
        import sys

        code = ("from warehouse import store\n"
                "try:\n    store.connect(%r).__enter__()\nexcept store.WarehouseError as e:\n    print(e)\n" % str(db))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "open for writing by another process" in out.stdout


@pytest.fixture(scope="module")
def builtin_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("builtin") / "w.duckdb"
    store.ingest(db, [SourceSpec(name="python-docs", builtin="python-docs")])
    task = store.define_label_task(db, "stdlib-module", "python-docs", 8, 80, 0.15, 0.15)
    snap = store.create_snapshot(db, "python-docs", ["python-docs"], 0.05, 0.05)
    return db, task, snap


def test_builtin_corpus_size_and_task(builtin_db):
    db, task, snap = builtin_db
    assert 800_000 < snap.n_chars < 5_000_000, snap.n_chars
    assert len(task.labels) == 8
    assert all(task.counts[s] > 50 for s in ("train", "validation", "test"))


def test_downstream_documents_are_excluded_from_pretraining(builtin_db):
    db, task, snap = builtin_db
    with duckdb.connect(str(db), read_only=True) as con:
        overlap_ids = con.execute(
            """SELECT count(*) FROM snapshot_documents s JOIN task_examples t USING (doc_id)
               WHERE s.snapshot_id = ?""", [snap.snapshot_id]).fetchone()[0]
        # By text too: doc_id is the content hash, but check what training would actually read.
        overlap_text = con.execute(
            """SELECT count(*) FROM snapshot_documents s JOIN documents d USING (doc_id)
               WHERE s.snapshot_id = ? AND d.text IN
               (SELECT d2.text FROM task_examples t JOIN documents d2 USING (doc_id))""", [snap.snapshot_id]).fetchone()[0]
        n_task = con.execute("SELECT count(*) FROM task_examples").fetchone()[0]
    assert n_task == task.counts["total"] > 1000
    assert overlap_ids == 0 and overlap_text == 0
    pretrain_texts = {t for split in ("train", "validation", "test")
                      for batch in store.iter_texts(db, snap.snapshot_id, split) for t in batch}
    for split in ("train", "validation", "test"):
        texts, _, _ = store.task_split(db, "stdlib-module", split)
        assert not pretrain_texts.intersection(texts)


def test_tokenizer_and_shards_round_trip(builtin_db, tmp_path):
    db, _, snap = builtin_db
    info = train_tokenizer(db, snap.snapshot_id, TokenizerConfig(vocab_size=2000), tmp_path / "tok.json")
    assert info["specials"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4, "sentinel": 5, "sentinel_last": 36}
    counts = write_token_shards(db, snap.snapshot_id, tmp_path / "tok.json", tmp_path / "shards")
    tokens, offsets = load_split(tmp_path / "shards", "validation")
    assert counts["validation"]["documents"] == snap.splits["validation"] == len(offsets) - 1
    assert offsets[-1] == len(tokens) == counts["validation"]["tokens"]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "tok.json"))
    first_doc = next(store.iter_texts(db, snap.snapshot_id, "validation"))[0]
    assert tok.decode(tokens[offsets[0]:offsets[1]].tolist()) == first_doc


def test_shuffle_windows_keeps_the_words_and_breaks_each_window():
    words = "the quick brown fox jumps over the lazy dog again and again".split()
    out = shuffle_windows(words, 4, random.Random(0))
    assert sorted(out) == sorted(words)
    for i in range(0, len(words), 4):
        assert sorted(out[i:i + 4]) == sorted(words[i:i + 4])  # words stay in their window
        assert out[i:i + 4] != words[i:i + 4]  # and every window with two different words changes
    assert shuffle_windows(["a", "a", "a"], 4, random.Random(0)) == ["a", "a", "a"]


def test_word_order_task_is_balanced_and_its_documents_leave_pretraining(builtin_db):
    db = builtin_db[0]
    task = define_builtin_task(db, WORD_ORDER, "python-docs", 8, 80, 0.15, 0.15)
    assert task.labels == ["original", "shuffled"] and task.counts["total"] > 600
    assert all(task.counts[s] > 80 for s in ("train", "validation", "test"))
    labels = [lab for s in ("train", "validation", "test") for lab in store.task_split(db, WORD_ORDER, s)[2]]
    assert 0.4 < labels.count("shuffled") / len(labels) < 0.6
    snap = store.create_snapshot(db, "python-docs-wo", ["python-docs"], 0.05, 0.05)
    with duckdb.connect(str(db), read_only=True) as con:
        kept = con.execute(
            """SELECT count(*) FROM snapshot_documents s JOIN task_examples t ON s.doc_id = t.source_doc
               WHERE s.snapshot_id = ?""", [snap.snapshot_id]).fetchone()[0]
        rows = con.execute(
            """SELECT t.label, d.text, o.text FROM task_examples t JOIN documents d USING (doc_id)
               JOIN documents o ON o.doc_id = t.source_doc WHERE t.task = ?""", [WORD_ORDER]).fetchall()
    assert len(rows) == task.counts["total"] and kept == 0  # no passage's document is pretraining text
    for label, text, source in rows:  # the first words of the source document, as written or shuffled
        first = source.split()[:MAX_WORDS]
        assert sorted(text.split()) == sorted(first)
        assert (text == " ".join(first)) == (label == "original")
    texts, _, names = store.task_split(db, WORD_ORDER, "test")
    # The same warehouse gives the same task (splits by hash, shuffles seeded by the document).
    again = define_builtin_task(db, WORD_ORDER, "python-docs", 8, 80, 0.15, 0.15)
    assert again.counts == task.counts and store.task_split(db, WORD_ORDER, "test") == (texts, None, names)


def test_quality_filters_reject_junk_at_ingest_with_the_key_to_change(tmp_path):
    corpus = write_corpus(tmp_path / "c", 12)
    (corpus / "symbols.txt").write_text("# ## ### #### ... " * 40)
    (corpus / "footer.txt").write_text("All rights reserved.\nPrivacy policy\nTerms of use\nHome page text here\n")
    db = tmp_path / "w.duckdb"
    report = store.ingest(db, [SourceSpec(name="c", path=str(corpus))], quality=QualityConfig())
    with duckdb.connect(str(db), read_only=True) as con:
        reasons = dict(con.execute("SELECT regexp_extract(path, '[^/]+$'), reason FROM rejects").fetchall())
    assert reasons["symbols.txt"].startswith("quality: ") and "corpus.quality." in reasons["symbols.txt"]
    assert reasons["footer.txt"].startswith("quality: boilerplate_lines")
    assert report.reject_reasons == {"quality": 2}
    assert report.n_inputs == report.n_documents + report.n_duplicates + report.n_rejects
    # Switched off, the same files are documents.
    off = store.ingest(tmp_path / "off.duckdb", [SourceSpec(name="c", path=str(corpus))],
                       quality=QualityConfig(enabled=False))
    assert off.n_rejects == 0 and off.n_documents == report.n_documents + 2


def test_near_duplicates_leave_the_snapshot_and_are_recorded(tmp_path):
    corpus = write_corpus(tmp_path / "c", 12)
    base = (corpus / "doc0.txt").read_text()
    (corpus / "doc0-copy.txt").write_text(base.replace(".", "!", 1))  # one character changed
    db = tmp_path / "w.duckdb"
    store.ingest(db, [SourceSpec(name="c", path=str(corpus))])
    plain = store.create_snapshot(db, "c", ["c"], 0.1, 0.1)
    deduped = store.create_snapshot(db, "c", ["c"], 0.1, 0.1, NearDupConfig())
    assert deduped.n_documents == plain.n_documents - 1 and deduped.snapshot_id != plain.snapshot_id
    with duckdb.connect(str(db), read_only=True) as con:
        pairs = con.execute("SELECT doc_id, duplicate_of, jaccard FROM snapshot_near_duplicates WHERE snapshot_id = ?",
                            [deduped.snapshot_id]).fetchall()
    (dropped, kept, jaccard), = pairs
    assert {dropped, kept} == {store.doc_id(base), store.doc_id(base.replace(".", "!", 1))}
    assert kept < dropped and jaccard >= 0.8  # the smallest id is the one kept
    assert store.create_snapshot(db, "c", ["c"], 0.1, 0.1, NearDupConfig()).snapshot_id == deduped.snapshot_id
