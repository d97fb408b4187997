"""Hostile input and interrupted writers: the warehouse never crashes, never loses count, never half-commits."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import duckdb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT, write_corpus
from warehouse import store
from warehouse.sources import SourceSpec

EXTENSIONS = [".txt", ".md", ".jsonl", ".bin", "", ".zip", ".tar.gz", ".tar.xz"]
json_lines = st.lists(
    st.one_of(
        st.dictionaries(st.sampled_from(["text", "other"]), st.one_of(st.text(), st.integers(), st.none()), max_size=2)
        .map(json.dumps),
        st.text(max_size=40),  # not JSON at all
        st.just('{"text": "\\ud800 lone surrogate"}'),
        st.just("[" * 5000 + "]" * 5000),  # deeper than the parser's recursion limit
    ),
    max_size=6,
).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass"))


def _valid_archive(kind: str) -> bytes:
    import io
    import tarfile
    import zipfile

    buf, text = io.BytesIO(), b"an archived document about tokens and attention, long enough to keep. " * 4
    if kind == "zip":
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("a.txt", text)
            zf.writestr("b.jsonl", b'{"text": "line one of the archive"}\n')
    else:
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            info = tarfile.TarInfo("a.txt")
            info.size = len(text)
            tf.addfile(info, io.BytesIO(text))
    return buf.getvalue()


def _mutate(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for position, value in flips:
        out[position % len(out)] = value
    return bytes(out)


flips = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6)
contents = st.one_of(st.binary(max_size=300), st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
                     json_lines)
files = st.one_of(
    st.tuples(st.sampled_from(EXTENSIONS), contents),
    st.tuples(st.just(".zip"), st.builds(lambda f: _mutate(_valid_archive("zip"), f), flips)),  # damaged archives
    st.tuples(st.just(".tar.gz"), st.builds(lambda f: _mutate(_valid_archive("tgz"), f), flips)),
)


def _rows(db, table):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(files, min_size=1, max_size=8))
def test_random_and_hostile_bytes_are_all_accounted_for(tmp_path_factory, files):
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "corpus").mkdir()
    for i, (ext, data) in enumerate(files):
        (folder / "corpus" / f"f{i}{ext}").write_bytes(data)
    db = folder / "w.duckdb"
    try:
        report = store.ingest(db, [SourceSpec(name="fuzz", path=str(folder / "corpus"))], min_chars=1)
        n_inputs = report.n_inputs
    except store.WarehouseError as exc:  # nothing usable: one clear error, and the rejects are still recorded
        assert "the corpus is empty" in str(exc)
        n_inputs = int(str(exc).split(": ")[1].split(" inputs")[0])
    # Every input (a file, or a line of a .jsonl file) is a provenance row of a document or a reject.
    assert _rows(db, "provenance") + _rows(db, "rejects") == n_inputs


INGEST_STALLED_MID_WRITE = textwrap.dedent("""
    import contextlib, sys, time
    from warehouse import store
    from warehouse.sources import SourceSpec
    real_connect = store.connect

    class Stalls:  # the connection stalls right after the documents insert, inside the transaction
        def __init__(self, con):
            self.con = con
        def __getattr__(self, name):
            return getattr(self.con, name)
        def execute(self, sql, *args):
            result = self.con.execute(sql, *args)
            if sql.startswith("INSERT OR IGNORE INTO documents"):
                print("inserted", flush=True)
                time.sleep(120)
            return result

    @contextlib.contextmanager
    def connect(path, read_only=False):
        with real_connect(path, read_only) as con:
            yield Stalls(con)

    store.connect = connect
    store.ingest(sys.argv[1], [SourceSpec(name="c", path=sys.argv[2])])
""")


def test_an_ingest_killed_midway_leaves_the_last_snapshot_intact_and_a_rerun_completes(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", 40)
    db = tmp_path / "w.duckdb"
    spec = [SourceSpec(name="c", path=str(corpus))]
    store.ingest(db, spec)
    snap = store.create_snapshot(db, "c", ["c"], 0.1, 0.1)
    before = {t: _rows(db, t) for t in ("documents", "provenance", "snapshot_documents")}

    more = write_corpus(tmp_path / "more", 200)
    for f in more.iterdir():
        f.rename(corpus / f"new-{f.name}")
    proc = subprocess.Popen([sys.executable, "-c", INGEST_STALLED_MID_WRITE, str(db), str(corpus)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "inserted"  # 200 new documents written, not yet committed
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert {t: _rows(db, t) for t in before} == before  # nothing half-written
    with store.connect(db, read_only=True) as con:
        assert store.snapshot_info(con, snap.snapshot_id) == snap

    store.ingest(db, spec)
    again = store.ingest(db, spec)
    assert again.n_new == 0
    with duckdb.connect(str(db), read_only=True) as con:
        dupes = con.execute("SELECT count(*) - count(DISTINCT doc_id) FROM documents").fetchone()[0]
    assert dupes == 0 and _rows(db, "documents") > before["documents"]


HOLD_WRITER = textwrap.dedent("""
    import sys, time, duckdb
    con = duckdb.connect(sys.argv[1])
    print("holding", flush=True)
    time.sleep(60)
""")


def test_a_second_writer_is_refused_with_a_clear_message(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", 10)
    db = tmp_path / "w.duckdb"
    store.ingest(db, [SourceSpec(name="c", path=str(corpus))])
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WRITER, str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        try:
            store.ingest(db, [SourceSpec(name="c", path=str(corpus))])
            raise AssertionError("a second writer was let in")
        except store.WarehouseError as exc:
            message = str(exc)
        assert "open for writing by another process" in message and "\n" not in message
        assert f"(pid {holder.pid})" in message
    finally:
        holder.kill()
        holder.wait()
    assert store.ingest(db, [SourceSpec(name="c", path=str(corpus))]).n_new == 0


def test_links_devices_and_fifos_are_refused_not_followed_or_opened(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", 10)
    outside = tmp_path / "secret.txt"
    outside.write_text("a private file outside the corpus folder, long enough to be a document. " * 3)
    (corpus / "outside.txt").symlink_to(outside)
    (corpus / "inside.txt").symlink_to(next(corpus.glob("*.txt")))
    (corpus / "zero.txt").symlink_to("/dev/zero")  # reading it would never end
    os.mkfifo(corpus / "pipe.txt")  # opening it would block
    (corpus / "loop-a.txt").symlink_to(corpus / "loop-b.txt")
    (corpus / "loop-b.txt").symlink_to(corpus / "loop-a.txt")
    (corpus / "dangling.txt").symlink_to(tmp_path / "gone.txt")
    (corpus / "up").symlink_to(tmp_path)  # a folder link: followed, it would reach secret.txt and loop
    db = tmp_path / "w.duckdb"
    report = store.ingest(db, [SourceSpec(name="c", path=str(corpus))])
    with duckdb.connect(str(db), read_only=True) as con:
        reasons = {p.rsplit("/", 1)[-1]: r for p, r in con.execute("SELECT path, reason FROM rejects").fetchall()}
        texts = [t for (t,) in con.execute("SELECT text FROM documents").fetchall()]
    assert reasons["outside.txt"].startswith("symlink pointing outside the source folder")
    assert reasons["zero.txt"].startswith("symlink pointing outside") or reasons["zero.txt"].startswith("not a regular")
    assert reasons["pipe.txt"] == "not a regular file (a device, FIFO or socket)"
    assert reasons["loop-a.txt"] == reasons["loop-b.txt"] == reasons["dangling.txt"] == "broken symlink or symlink loop"
    assert reasons["up"].startswith("symlink pointing outside")
    assert not any("private file" in t for t in texts)
    assert report.n_inputs == report.n_documents + report.n_rejects + 1  # inside.txt: a duplicate document


def _zip_symlink(zf, name: str, target: str) -> None:
    import stat as st
    import zipfile

    info = zipfile.ZipInfo(name)
    info.external_attr = (st.S_IFLNK | 0o777) << 16
    zf.writestr(info, target)


def test_archives_are_read_in_memory_and_unsafe_members_refused(tmp_path):
    import io
    import tarfile
    import zipfile

    body = "a document inside an archive, about masked language models and tokens. " * 2
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with zipfile.ZipFile(corpus / "docs.zip", "w") as zf:
        zf.writestr("good.txt", body + "zip")
        zf.writestr("sub/notes.md", body + "md")
        zf.writestr("lines.jsonl", json.dumps({"text": body + "jsonl"}) + "\n{broken\n")
        zf.writestr("../escape.txt", body + "escape")
        zf.writestr("/etc/absolute.txt", body + "absolute")
        zf.writestr("inner.zip", b"PK\x05\x06" + b"\0" * 18)
        zf.writestr("image.png", b"\x89PNG")
        _zip_symlink(zf, "link.txt", "/etc/passwd")
        zf.writestr(zipfile.ZipInfo(""), body)  # found by fuzzing: zipfile itself fails on nameless entries
    with tarfile.open(corpus / "docs.tar.gz", "w:gz") as tf:
        for name, data in (("good.txt", (body + "tar").encode()), ("a/../../up.txt", b"x" * 64)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, kind in (("dev.txt", tarfile.CHRTYPE), ("sym.txt", tarfile.SYMTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/dev/zero"
            tf.addfile(info)
    (corpus / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    before = sorted(p.name for p in tmp_path.iterdir())

    db = tmp_path / "w.duckdb"
    report = store.ingest(db, [SourceSpec(name="c", path=str(corpus))])
    with duckdb.connect(str(db), read_only=True) as con:
        reasons = {p.split("/corpus/", 1)[1]: r for p, r in con.execute("SELECT path, reason FROM rejects").fetchall()}
        texts = sorted(t.rsplit(" ", 1)[-1] for (t,) in con.execute("SELECT text FROM documents").fetchall())
    assert texts == ["jsonl", "md", "tar", "zip"]
    zip_slip = "unsafe member path (absolute or with '..'; zip slip)"
    assert reasons["docs.zip!../escape.txt"] == reasons["docs.zip!/etc/absolute.txt"] == zip_slip
    assert reasons["docs.tar.gz!a/../../up.txt"] == zip_slip
    assert reasons["docs.zip!inner.zip"] == "nested archive (not read)"
    assert reasons["docs.zip!link.txt"] == reasons["docs.tar.gz!sym.txt"] == "link inside an archive (not followed)"
    assert reasons["docs.tar.gz!dev.txt"] == "device or special file inside an archive"
    assert reasons["docs.zip!image.png"].startswith("unsupported format")
    assert reasons["docs.zip!lines.jsonl:2"].startswith("malformed JSON")
    assert reasons["broken.zip"].startswith("corrupted archive")
    assert reasons["docs.zip"] == "archive member without a name"
    assert report.n_inputs == report.n_documents + report.n_rejects
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["w.duckdb"])  # nothing extracted
