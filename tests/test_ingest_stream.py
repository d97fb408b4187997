"""Streaming ingest and token shards: flat memory, committed batches, every input counted, atomic shards."""
import json
from pathlib import Path
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc

import duckdb
import numpy as np
import psutil
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from tests.conftest import ROOT, write_corpus
from warehouse import store
from warehouse.shards import load_split, write_token_shards
from warehouse.sources import SourceSpec
from warehouse.tokenizer import TokenizerConfig, train_tokenizer


def _random_corpus(folder, megabytes: float, seed: int = 0) -> tuple[int, int]:
    """Distinct ~16 KB documents of random words; returns (files, characters)."""
    rng = random.Random(seed)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]
    folder.mkdir(parents=True)
    n_files = n_chars = 0
    while n_chars < megabytes * 2**20:
        text = "\n".join(" ".join(rng.choices(words, k=12)) + "." for _ in range(200))
        (folder / f"d{n_files:05d}.txt").write_text(text)
        n_files, n_chars = n_files + 1, n_chars + len(text)
    return n_files, n_chars


def _count(db, sql):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchone()[0]


def test_ingest_memory_stays_flat_in_the_corpus_size(tmp_path, monkeypatch):
    n_files, n_chars = _random_corpus(tmp_path / "big", 40)
    # Imports and DuckDB's first allocations happen here, before the measurement.
    store.ingest(tmp_path / "warm.duckdb", [SourceSpec(name="w", path=str(write_corpus(tmp_path / "small", 10)))])
    monkeypatch.setattr(store, "POOL_AFTER_CHARS", 0)  # the cleaning workers from the first chunk on
    monkeypatch.setattr(store, "CHUNK_CHARS", 2**18)
    os.register_at_fork(after_in_child=tracemalloc.stop)  # measure the ingest process; tracing slows workers
    tracemalloc.start()
    try:
        report = store.ingest(tmp_path / "w.duckdb", [SourceSpec(name="big", path=str(tmp_path / "big"))],
                              batch_chars=2**20, workers=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.n_inputs == report.n_documents == report.n_new == n_files
    # Holding the corpus (as the ingest did before batches) takes more than n_chars bytes of str alone;
    # a 1 MB batch, plus the 256 KB chunks in flight to the two workers, stays far below.
    print(f"peak {peak / 2**20:.1f} MB of Python objects for {n_chars / 2**20:.0f} MB of text")
    assert peak < n_chars / 4, f"ingest held {peak / 2**20:.1f} MB of Python objects for {n_chars / 2**20:.0f} MB"
    assert _count(tmp_path / "w.duckdb", "SELECT sum(n_chars) FROM documents") == n_chars


def test_inputs_are_documents_plus_duplicates_plus_rejects(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", 12)  # 12 distinct documents: 4 .txt, 4 .md, 4 .jsonl lines
    repeated = "the same text, saved under several names, about attention and tokens. " * 3
    for name in ("a/copy.txt", "b/copy.txt", "b/again.md"):
        (corpus / name).parent.mkdir(exist_ok=True)
        (corpus / name).write_text(repeated)
    with open(corpus / "docs.jsonl", "a") as f:
        f.write(json.dumps({"text": repeated}) + "\n")  # and as a line of a .jsonl file
        f.write("{not json\n")
    (corpus / "binary.txt").write_bytes(b"\x00\x01 not text")
    (corpus / "latin1.txt").write_bytes("caf\xe9 ol\xe9 ".encode("latin-1") * 20)
    (corpus / "short.txt").write_text("tiny")
    (corpus / "blank.md").write_text(" \n\t\n")
    (corpus / "image.png").write_bytes(b"\x89PNG\r\n")
    first = (corpus / "doc0.txt").read_text()
    (corpus / "z-first-again.txt").write_text(first)  # a corpus document repeated in a later batch
    db = tmp_path / "w.duckdb"
    spec = [SourceSpec(name="c", path=str(corpus))]

    report = store.ingest(db, spec, batch_docs=3)  # small batches: repeats fall in different batches
    assert report.n_documents == 12 + 1
    assert report.n_duplicates == 3 + 1  # 4 inputs of `repeated` give 1 document; doc0 twice gives 1
    assert report.n_rejects == 6 and report.reject_reasons["malformed JSON"] == 1
    assert report.n_inputs == report.n_documents + report.n_duplicates + report.n_rejects == 23
    assert _count(db, "SELECT count(*) FROM documents") == report.n_new == 13
    # Lineage keeps every path of the repeated text; every input is a provenance or a reject row.
    with duckdb.connect(str(db), read_only=True) as con:
        paths = [p for (p,) in con.execute("SELECT path FROM provenance WHERE doc_id = ?", [store.doc_id(
            repeated.strip())]).fetchall()]
    assert sorted(p.split("/corpus/")[1].rsplit(":", 1)[0] for p in paths) == [
        "a/copy.txt", "b/again.md", "b/copy.txt", "docs.jsonl"]
    assert _count(db, "SELECT count(*) FROM provenance") + _count(db, "SELECT count(*) FROM rejects") == 23

    again = store.ingest(db, spec, batch_docs=5)
    assert (again.n_new, again.n_documents, again.n_duplicates, again.n_rejects) == (0, 13, 4, 6)
    assert _count(db, "SELECT count(*) FROM provenance") + _count(db, "SELECT count(*) FROM rejects") == 23
    assert _count(db, "SELECT count(*) FROM ingests") == 2


KILLED_AFTER_A_BATCH = textwrap.dedent("""
    import sys, time
    from warehouse import store
    from warehouse.sources import SourceSpec
    store.POOL_AFTER_CHARS = 0  # worker processes clean the texts
    write_batch, n = store._write_batch, [0]

    def committed_then_stalls(*args):
        write_batch(*args)
        n[0] += 1
        if n[0] == 2:
            print("committed", flush=True)
            time.sleep(120)

    store._write_batch = committed_then_stalls
    store.ingest(sys.argv[1], [SourceSpec(name="c", path=sys.argv[2])], batch_docs=40, workers=2)
""")


def test_an_ingest_killed_between_batches_keeps_them_leaves_no_workers_and_reruns(tmp_path):
    n_files, _ = _random_corpus(tmp_path / "corpus", 3)
    db = tmp_path / "w.duckdb"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_AFTER_A_BATCH, str(db), str(tmp_path / "corpus")],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "committed"
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert 1 <= len(workers) <= 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    gone, alive = psutil.wait_procs(workers, timeout=10)  # orphaned workers notice and exit
    assert not alive, f"worker processes outlived the killed ingest: {alive}"
    assert _count(db, "SELECT count(*) FROM documents") == 80  # two committed batches of 40
    assert _count(db, "SELECT count(*) FROM ingests") == 0  # the ingest did not finish

    report = store.ingest(db, [SourceSpec(name="c", path=str(tmp_path / "corpus"))])
    assert report.n_documents == n_files and report.n_new == n_files - 80
    assert _count(db, "SELECT count(*) FROM documents") == n_files
    assert _count(db, "SELECT count(*) FROM ingests") == 1


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    db = root / "w.duckdb"
    store.ingest(db, [SourceSpec(name="c", path=str(write_corpus(root / "corpus", 120)))])
    snap = store.create_snapshot(db, "c", ["c"], 0.1, 0.1)
    train_tokenizer(db, snap.snapshot_id, TokenizerConfig(vocab_size=600), root / "tok.json")
    return db, snap, root / "tok.json"


def test_shards_read_back_as_the_direct_encoding(snapshot, tmp_path):
    db, snap, tok_path = snapshot
    counts = write_token_shards(db, snap.snapshot_id, tok_path, tmp_path / "shards")
    tok = Tokenizer.from_file(str(tok_path))
    meta = json.loads((tmp_path / "shards" / "meta.json").read_text())
    assert meta["snapshot_id"] == snap.snapshot_id and meta["dtype"] == "<u2" and meta["splits"] == counts
    assert len(meta["tokenizer_sha256"]) == 64
    for split in store.SPLITS:
        tokens, offsets = load_split(tmp_path / "shards", split)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and not tokens.flags.writeable
        texts = [t for batch in store.iter_texts(db, snap.snapshot_id, split) for t in batch]
        assert len(offsets) == len(texts) + 1 == counts[split]["documents"] + 1
        for i, text in enumerate(texts):
            assert tokens[offsets[i]:offsets[i + 1]].tolist() == tok.encode(text, add_special_tokens=False).ids
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == sorted(
        ["meta.json"] + [f"{s}.{kind}" for s in store.SPLITS for kind in ("tokens.bin", "offsets.npy")])


def test_ordered_reads_come_back_in_doc_id_order_without_a_sort_in_duckdb(snapshot, monkeypatch):
    db, snap, _ = snapshot
    # A buffer pool far smaller than DuckDB would want for sorting the split's text: the read must not sort in it.
    monkeypatch.setenv("PRETRAIN_DUCKDB_MEMORY", "32MB")
    for split in store.SPLITS:
        ordered = [(i, t) for ids, texts in store.iter_docs(db, snap.snapshot_id, split, batch=7) for i, t in zip(ids, texts)]
        loose = [(i, t) for ids, texts in store.iter_docs(db, snap.snapshot_id, split, ordered=False) for i, t in zip(ids, texts)]
        assert [i for i, _ in ordered] == sorted(i for i, _ in loose)
        assert sorted(ordered) == sorted(loose) and all(store.doc_id(t) == i for i, t in ordered)
    assert list(Path(str(db) + ".tmp").iterdir()) == []  # the scratch file is gone


def test_a_vocabulary_past_65536_gets_uint32_tokens(tmp_path):
    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(70_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tok.json"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in range(12):
        (corpus / f"d{d}.txt").write_text(" ".join(f"w{(d * 7919 + k * 104729) % 70_000}" for k in range(50)))
    db = tmp_path / "w.duckdb"
    store.ingest(db, [SourceSpec(name="c", path=str(corpus))])
    snap = store.create_snapshot(db, "c", ["c"], 0.0, 0.0)
    write_token_shards(db, snap.snapshot_id, tmp_path / "tok.json", tmp_path / "shards")
    tokens, offsets = load_split(tmp_path / "shards", "train")
    assert tokens.dtype == np.uint32 and tokens.max() > 65_536
    texts = [t for batch in store.iter_texts(db, snap.snapshot_id, "train") for t in batch]
    assert tokens.tolist() == [i for t in texts for i in tok.encode(t).ids]
    empty, empty_offsets = load_split(tmp_path / "shards", "validation")  # no documents: still loads
    assert len(empty) == 0 and empty.dtype == np.uint32 and empty_offsets.tolist() == [0]


SHARDS_KILLED = textwrap.dedent("""
    import sys
    from warehouse.shards import write_token_shards
    write_token_shards(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4])
""")


def test_a_killed_shard_writer_leaves_nothing_that_loads(snapshot, tmp_path):
    db, snap, tok_path = snapshot
    out = tmp_path / "shards"
    write_token_shards(db, snap.snapshot_id, tok_path, out)  # a complete folder, about to be rewritten
    (out / "train.tokens.bin.tmp").write_bytes(b"\x01\x02" * 999)  # left by an earlier killed run
    (out / "meta.json").unlink()
    with pytest.raises(store.WarehouseError, match="no complete token shards"):
        load_split(out, "train")

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SHARDS_KILLED, str(db), snap.snapshot_id, str(tok_path), str(out)],
                            cwd=ROOT, env=env)
    deadline = time.monotonic() + 60
    while (out / "train.tokens.bin.tmp").stat().st_size == 1998 and time.monotonic() < deadline:
        time.sleep(0.005)  # until the writer reopens the temporary file
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    if not (out / "meta.json").exists():  # killed mid-write (else it had finished, and the shards are whole)
        with pytest.raises(store.WarehouseError, match="no complete token shards"):
            load_split(out, "train")
    counts = write_token_shards(db, snap.snapshot_id, tok_path, out)  # the next run completes
    tokens, offsets = load_split(out, "train")
    assert offsets[-1] == len(tokens) == counts["train"]["tokens"]
    assert not list(out.glob("*.tmp"))

    (out / "train.tokens.bin").write_bytes((out / "train.tokens.bin").read_bytes()[:-2])  # truncated by hand
    with pytest.raises(store.WarehouseError, match="delete .* and run the token-shards stage again"):
        load_split(out, "train")


def test_the_first_shard_layout_still_loads(tmp_path):
    np.save(tmp_path / "train.tokens.npy", np.arange(10, dtype=np.uint16))
    np.save(tmp_path / "train.offsets.npy", np.array([0, 4, 10], dtype=np.int64))
    (tmp_path / "meta.json").write_text(json.dumps({"snapshot_id": "s", "splits": {"train": {"documents": 2}}}))
    tokens, offsets = load_split(tmp_path, "train")
    assert tokens.tolist() == list(range(10)) and offsets.tolist() == [0, 4, 10]
