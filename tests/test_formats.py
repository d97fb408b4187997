"""Corpus formats: each format read from a real file (good and malformed), compressed, archived, with a
lying or missing extension; size caps, encoding policy, vanished and unreadable files; memory."""
import bz2
import csv
import gzip
import io
import json
import lzma
import os
import tarfile
import tracemalloc
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from warehouse import archives
from warehouse.sources import VANISHED, RawDoc, Reject, SourceError, SourceSpec, read_file, read_source

COMPRESS = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress, "zst": zstandard.ZstdCompressor().compress}
KIND = {"gz": "gzip", "bz2": "bz2", "xz": "xz", "zst": "zstd"}
BODY = "Masked language models predict hidden tokens from both sides of the context."


def _read(path, **spec):
    """(documents, rejects) of one file, each keyed by its path relative to the file's folder."""
    docs, rejects = {}, {}
    for item in read_file(SourceSpec(name="t", path=str(path), **spec), path):
        key = item.path[len(str(path.parent)) + 1:]
        if isinstance(item, RawDoc):
            assert key not in docs, f"two documents at {key}"
            docs[key] = item.text
        else:
            assert isinstance(item, Reject) and key not in rejects, f"two rejects at {key}"
            rejects[key] = item.reason
    assert docs or rejects, "a file left unaccounted for"
    return docs, rejects


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar(members: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


# -- plain text and HTML --------------------------------------------------------------------------

@pytest.mark.parametrize("ext", [".txt", ".md", ".rst"])
def test_a_text_file_is_one_document(tmp_path, ext):
    text = f"Title\n=====\n\n{BODY}\n\n{{\"not\": \"json\"}}\n"
    assert _read(_write(tmp_path / f"a{ext}", b"\xef\xbb\xbf" + text.encode()))[0] == {f"a{ext}": text}
    _, rejects = _read(_write(tmp_path / f"b{ext}", b"\x00\x01 binary"))
    assert rejects == {f"b{ext}": "binary content (NUL bytes)"}


HTML = """<!DOCTYPE html><html><head><title>T</title><style>p{color:red}</style><script>var x=1</script></head>
<body><h1>Masked  language
models</h1><p>BERT masks <b>15%</b> of tokens.</p><script>alert(1)</script><noscript>enable js</noscript>
<template><p>hidden</p></template><svg><text>svg text</text></svg>
<ul><li>one</li><li>two<br>three</li></ul><pre>def f():
    return 1</pre><table><tr><td>a</td><td>b</td></tr></table><div><p>unclosed <i>tags</div> tail &amp; &lt;x&gt;"""


@pytest.mark.parametrize("ext", [".html", ".htm", ".xhtml"])
def test_html_text_is_extracted_block_by_block(tmp_path, ext):
    docs, _ = _read(_write(tmp_path / f"page{ext}", HTML.encode()))
    assert docs == {f"page{ext}": "Masked language models\nBERT masks 15% of tokens.\none\ntwo\nthree\n"
                                  "def f():\n    return 1\na b\nunclosed tags\ntail & <x>"}
    empty = b"<html><head><title>t</title><script>x()</script></head><body> <!-- c --> <style>p{}</style></body>"
    assert _read(_write(tmp_path / f"empty{ext}", empty))[1] == {
        f"empty{ext}": "empty after cleaning (no text in the HTML)"}


# -- record formats -------------------------------------------------------------------------------

def test_jsonl_nested_fields_list_indices_and_bad_lines(tmp_path):
    lines = [json.dumps({"meta": {"body": "first body", "paragraphs": ["p zero", "p one"]}}), "",
             "{broken", json.dumps({"meta": {"other": 1}}), '{"meta": {"body": "\\ud800 lone"}}',
             json.dumps({"meta": {"body": 7}}), json.dumps({"meta.body": "a dotted key"})]
    path = _write(tmp_path / "a.ndjson", "\n".join(lines).encode())
    docs, rejects = _read(path, text_field="meta.body")
    assert docs == {"a.ndjson:1": "first body", "a.ndjson:7": "a dotted key"}
    assert rejects == {"a.ndjson:3": "malformed JSON: Expecting property name enclosed in double quotes",
                       "a.ndjson:4": "no string field 'meta.body'",
                       "a.ndjson:5": "invalid Unicode (a lone surrogate escape)",
                       "a.ndjson:6": "no string field 'meta.body'"}
    assert _read(path, text_field="meta.paragraphs.1")[0] == {"a.ndjson:1": "p one"}
    assert _read(_write(tmp_path / "blank.jsonl", b"\n  \n"))[1] == {"blank.jsonl": "no records (empty file)"}


def test_json_array_object_with_a_list_single_record_and_malformed(tmp_path):
    records = [{"text": "one"}, {"text": "two"}, {"body": "no text"}]
    assert _read(_write(tmp_path / "arr.json", json.dumps(records).encode())) == (
        {"arr.json#0": "one", "arr.json#1": "two"}, {"arr.json#2": "no string field 'text'"})
    wrapped = {"version": 2, "data": [{"meta": {"body": "inside a list"}}]}
    assert _read(_write(tmp_path / "obj.json", json.dumps(wrapped).encode()), text_field="meta.body")[0] == {
        "obj.json#0": "inside a list"}
    single = {"text": "a single record", "tags": ["x", "y"]}  # has the field: one record, lists ignored
    assert _read(_write(tmp_path / "one.json", json.dumps(single).encode()))[0] == {"one.json": "a single record"}
    assert _read(_write(tmp_path / "bad.json", b'[{"text": "x"},'))[1] == {
        "bad.json": "malformed JSON: Expecting value at line 1 column 16"}
    two = _read(_write(tmp_path / "two.json", json.dumps({"a": [], "b": []}).encode()))[1]["two.json"]
    assert two.startswith("no records (a JSON object with neither a 'text' field nor one list") and "'a', 'b'" in two
    lines = _write(tmp_path / "lines.json", b'{"text": "l1"}\n{"text": "l2"}\n')  # JSON lines named .json
    assert _read(lines)[0] == {"lines.json:1": "l1", "lines.json:2": "l2"}


def _csv(rows, delimiter=","):
    buf = io.StringIO()
    csv.writer(buf, delimiter=delimiter, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode()


@pytest.mark.parametrize("fmt,delimiter", [("csv", ","), ("tsv", "\t")])
def test_delimited_columns_rows_and_malformed(tmp_path, fmt, delimiter):
    good = _csv([["id", "text"], ["1", "plain row"], ["2", f"a cell with{delimiter} delimiter and\na newline"],
                 [], ["3", "after a blank line"]], delimiter)
    path = _write(tmp_path / f"a.{fmt}", good)
    assert _read(path) == ({f"a.{fmt}:2": "plain row", f"a.{fmt}:3": f"a cell with{delimiter} delimiter and\na newline",
                            f"a.{fmt}:6": "after a blank line"}, {})
    assert _read(path, text_field="body")[1] == {
        f"a.{fmt}": "no column 'body' (its columns: 'id', 'text'); set corpus.sources[].text_field"}
    d = delimiter
    bad = f"id{d}text\n1{d}fine\n2{d}too{d}many\n3{d}\"bad\"quote\n4{d}ok\n"
    docs, rejects = _read(_write(tmp_path / f"bad.{fmt}", bad.encode()))
    assert docs == {f"bad.{fmt}:2": "fine", f"bad.{fmt}:5": "ok"}
    kind = fmt.upper()
    assert rejects[f"bad.{fmt}:3"] == (f"malformed {kind} row (3 fields where the header has 2; quote cells holding "
                                       "the delimiter)")
    assert rejects[f"bad.{fmt}:4"].startswith(f"malformed {kind} row (")
    assert _read(_write(tmp_path / f"empty.{fmt}", b""))[1] == {f"empty.{fmt}": "no records (empty file)"}


def test_parquet_columns_struct_fields_and_damage(tmp_path):
    table = pa.table({"id": [1, 2, 3], "text": ["row zero", None, "row two"],
                      "meta": [{"body": "b0"}, {"body": "b1"}, {"body": None}]})
    path = _write(tmp_path / "a.parquet", _parquet_bytes(table))
    assert _read(path) == ({"a.parquet#0": "row zero", "a.parquet#2": "row two"},
                           {"a.parquet#1": "no string field 'text'"})
    assert _read(path, text_field="meta.body") == ({"a.parquet#0": "b0", "a.parquet#1": "b1"},
                                                   {"a.parquet#2": "no string field 'meta.body'"})
    assert _read(path, text_field="body")[1] == {
        "a.parquet": "no column 'body' (its columns: 'id', 'text', 'meta'); set corpus.sources[].text_field"}
    assert _read(path, text_field="id")[1] == {
        "a.parquet": "column 'id' is not text (int64); set corpus.sources[].text_field"}
    damaged = _write(tmp_path / "bad.parquet", b"PAR1" + b"\x00garbage" * 20 + b"PAR1")
    assert _read(damaged)[1]["bad.parquet"].startswith("corrupt parquet data (")


def test_parquet_is_read_by_record_batches(tmp_path):
    texts = [f"document number {i} " * 20 for i in range(5000)]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=1000)
    docs = [item for item in read_file(SourceSpec(name="t", path=str(path)), path)]
    assert [d.text for d in docs] == texts and docs[4999].path == f"{path}#4999"


# -- compression and archives ---------------------------------------------------------------------

@pytest.mark.parametrize("ext", list(COMPRESS))
def test_compressed_files_are_streamed_by_inner_name(tmp_path, ext):
    jsonl = b'{"text": "first"}\n{"text": "second"}\n'
    assert _read(_write(tmp_path / f"a.jsonl.{ext}", COMPRESS[ext](jsonl)))[0] == {
        f"a.jsonl.{ext}:1": "first", f"a.jsonl.{ext}:2": "second"}
    assert _read(_write(tmp_path / f"b.txt.{ext}", COMPRESS[ext](BODY.encode())))[0] == {f"b.txt.{ext}": BODY}
    assert _read(_write(tmp_path / f"c.csv.{ext}", COMPRESS[ext](b"text\nfrom a csv\n")))[0] == {
        f"c.csv.{ext}:2": "from a csv"}
    whole = COMPRESS[ext](BODY.encode() * 50)
    truncated = _read(_write(tmp_path / f"t.txt.{ext}", whole[: len(whole) // 2]))
    assert truncated[0] == {} and truncated[1][f"t.txt.{ext}"].startswith(f"corrupt {KIND[ext]} data (")
    garbage = whole[:6] + b"\xff" * 64
    assert _read(_write(tmp_path / f"g.txt.{ext}", garbage))[1][f"g.txt.{ext}"].startswith(f"corrupt {KIND[ext]} data")
    nested = _read(_write(tmp_path / f"n.txt.{ext}", COMPRESS[ext](COMPRESS[ext](BODY.encode()))))
    assert nested == ({}, {f"n.txt.{ext}": "nested compression (not read)"})
    # A name saying .gz over content that is not compressed (saved already decompressed): read what is there.
    assert _read(_write(tmp_path / f"plain.jsonl.{ext}", jsonl))[0] == {f"plain.jsonl.{ext}:1": "first",
                                                                       f"plain.jsonl.{ext}:2": "second"}
    assert _read(_write(tmp_path / f"junk.{ext}", b"\x00\x01\x02"))[1] == {
        f"junk.{ext}": f"corrupt {KIND[ext]} data (no {KIND[ext]} header)"}


def test_a_truncated_jsonl_gz_keeps_the_lines_before_the_damage(tmp_path):
    lines = b"".join(json.dumps({"text": f"line {i} " + "x" * 200}).encode() + b"\n" for i in range(2000))
    whole = gzip.compress(lines)
    docs, rejects = _read(_write(tmp_path / "a.jsonl.gz", whole[: len(whole) // 2]))
    assert 100 < len(docs) < 2000 and all(k.startswith("a.jsonl.gz:") for k in docs)
    assert list(rejects) == ["a.jsonl.gz"]  # the damage: one reject for the file, after its readable lines
    assert rejects["a.jsonl.gz"].startswith("corrupt gzip data (Compressed file ended")


MIXED = {
    "a.txt": b"plain text member",
    "sub/b.md": b"# markdown member",
    "c.jsonl": b'{"text": "jsonl one"}\n{broken\n',
    "d.csv": b"id,text\n1,csv row\n",
    "e.tsv": b"text\tid\ntsv row\t1\n",
    "f.html": b"<html><body><p>html member</p><script>no()</script></body></html>",
    "g.json": b'[{"text": "json record"}]',
    "h.parquet": _parquet_bytes(pa.table({"text": ["parquet row"]})),
    "i.jsonl.gz": gzip.compress(b'{"text": "gzipped member"}\n'),
    "j.png": b"\x89PNG\r\n\x1a\n",
    "k.tar": b"nested by name",
    "l.txt": _zip({"x.txt": b"nested by content"}),
}
MIXED_DOCS = {"a.txt": "plain text member", "sub/b.md": "# markdown member", "c.jsonl:1": "jsonl one",
              "d.csv:2": "csv row", "e.tsv:2": "tsv row", "f.html": "html member", "g.json#0": "json record",
              "h.parquet#0": "parquet row", "i.jsonl.gz:1": "gzipped member"}


@pytest.mark.parametrize("name,make", [
    ("m.zip", lambda: _zip(MIXED)),
    ("m.tar", lambda: _tar(MIXED)),
    ("m.tar.gz", lambda: _tar(MIXED, "w:gz")),
    ("m.tgz", lambda: _tar(MIXED, "w:gz")),
    ("m.tar.bz2", lambda: _tar(MIXED, "w:bz2")),
    ("m.tar.xz", lambda: _tar(MIXED, "w:xz")),
    ("m.tar.zst", lambda: zstandard.ZstdCompressor().compress(_tar(MIXED))),
])
def test_archives_hold_mixed_formats(tmp_path, name, make):
    docs, rejects = _read(_write(tmp_path / name, make()))
    assert docs == {f"{name}!{k}": v for k, v in MIXED_DOCS.items()}
    assert rejects[f"{name}!c.jsonl:2"].startswith("malformed JSON")
    assert rejects[f"{name}!j.png"].startswith("unsupported format .png; supported: ")
    assert rejects[f"{name}!k.tar"] == rejects[f"{name}!l.txt"] == "nested archive (not read)"
    assert len(rejects) == 4


def test_archive_caps_and_empty_archives(tmp_path, monkeypatch):
    monkeypatch.setattr(archives, "MAX_MEMBER_BYTES", 1 << 20)
    big = _read(_write(tmp_path / "big.zip", _zip({"big.txt": b"a" * (2 << 20), "ok.txt": b"small"})))
    assert big == ({"big.zip!ok.txt": "small"}, {"big.zip!big.txt": "member larger than 1 MiB once decompressed"})
    assert _read(_write(tmp_path / "none.zip", _zip({})))[1] == {"none.zip": "empty archive (no files in it)"}
    assert _read(_write(tmp_path / "broken.tar.gz", gzip.compress(b"not a tar" * 100)))[1]["broken.tar.gz"].startswith(
        "corrupted archive")


def test_decompression_bomb_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(archives, "MAX_MEMBER_BYTES", 1 << 20)
    # 64 MiB from a few KB: past both the (patched) 1 MiB cap and 100x the file's size.
    bomb = _write(tmp_path / "bomb.txt.zst", zstandard.ZstdCompressor().compress(b"a" * (64 << 20)))
    tracemalloc.start()
    try:
        assert _read(bomb) == ({}, {"bomb.txt.zst": "decompression bomb (larger than 1 MiB once decompressed)"})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak  # stopped near the cap, never the 64 MiB


# -- detection by content -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gz", "bz2", "xz", "zst", "zip", "tar", "parquet"])
def test_lying_extensions_are_read_by_their_magic_bytes(tmp_path, kind):
    makers = {"zip": lambda: _zip({"in.txt": BODY.encode()}), "tar": lambda: _tar({"in.txt": BODY.encode()}),
              "parquet": lambda: _parquet_bytes(pa.table({"text": [BODY]}))}
    data = makers[kind]() if kind in makers else COMPRESS[kind](BODY.encode())
    docs, rejects = _read(_write(tmp_path / "lies.txt", data))
    where = {"zip": "lies.txt!in.txt", "tar": "lies.txt!in.txt", "parquet": "lies.txt#0"}.get(kind, "lies.txt")
    assert (docs, rejects) == ({where: BODY}, {})


def test_missing_extensions_are_sniffed_and_unknown_content_refused(tmp_path):
    assert _read(_write(tmp_path / "page", b"  <!doctype html><p>sniffed html</p>"))[0] == {"page": "sniffed html"}
    assert _read(_write(tmp_path / "records", b'{"text": "r1"}\n{"text": "r2"}\n'))[0] == {
        "records:1": "r1", "records:2": "r2"}
    assert _read(_write(tmp_path / "array", b' [{"text": "a1"}]'))[0] == {"array#0": "a1"}
    assert _read(_write(tmp_path / "pretty", b'{\n  "text": "pretty printed"\n}\n'))[0] == {"pretty": "pretty printed"}
    assert _read(_write(tmp_path / "blob", b"\x7fELF\x02\x01\x00\x00"))[1] == {
        "blob": "binary content (NUL bytes; no extension and not a known format)"}
    assert _read(_write(tmp_path / "notes", b"just words"))[1]["notes"].startswith("unsupported format (no extension)")
    png = _read(_write(tmp_path / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"))[1]["image.png"]
    assert png.startswith("unsupported format .png; supported: ") and ".jsonl" in png and ".tar.zst" in png
    assert _read(_write(tmp_path / "u16.txt", "text".encode("utf-16")))[1] == {
        "u16.txt": "undecodable as UTF-8 (UTF-16 text; re-save it as UTF-8)"}


def test_an_explicit_format_overrides_detection(tmp_path):
    table = _write(tmp_path / "table.dat", b"text,n\nfrom csv,1\n")
    assert _read(table, format="csv")[0] == {"table.dat:2": "from csv"}
    raw = b'{"text": "kept as text"}\n'
    assert _read(_write(tmp_path / "a.jsonl", raw), format="txt")[0] == {"a.jsonl": raw.decode()}
    assert _read(_write(tmp_path / "b.jsonl.gz", gzip.compress(raw)), format="txt")[0] == {"b.jsonl.gz": raw.decode()}
    with pytest.raises(SourceError) as info:
        SourceSpec(name="t", path=str(tmp_path), format="xml")
    message = str(info.value)
    assert "\n" not in message and "unknown format 'xml'" in message
    assert "auto, txt, md, rst, html, jsonl, json, csv, tsv, parquet" in message
    with pytest.raises(SourceError, match="unknown encoding_errors 'ignore'; valid: reject, replace"):
        SourceSpec(name="t", encoding_errors="ignore")
    with pytest.raises(SourceError, match="max_doc_mb must be a positive number"):
        SourceSpec(name="t", max_doc_mb=0)


# -- limits, encodings, unreadable files ----------------------------------------------------------

def test_oversized_documents_are_rejected_unread(tmp_path):
    small = {"max_doc_mb": 0.001}  # 1000 bytes
    too_big = "document larger than 0.001 MB (corpus.sources[].max_doc_mb)"
    assert _read(_write(tmp_path / "a.txt", b"x" * 1001), **small) == ({}, {"a.txt": too_big})
    assert _read(_write(tmp_path / "ok.txt", b"x" * 1000), **small)[0] == {"ok.txt": "x" * 1000}
    assert _read(_write(tmp_path / "a.html", b"<p>" + b"x" * 2000 + b"</p>"), **small) == ({}, {"a.html": too_big})
    lines = json.dumps({"text": "y" * 5000}) + "\n" + json.dumps({"text": "short"}) + "\n"
    assert _read(_write(tmp_path / "a.jsonl", lines.encode()), **small) == (
        {"a.jsonl:2": "short"}, {"a.jsonl:1": too_big})
    cells = _csv([["text"], ["z" * 5000], ["short"]])
    assert _read(_write(tmp_path / "a.csv", cells), **small) == ({"a.csv:3": "short"}, {"a.csv:2": too_big})
    assert _read(_write(tmp_path / "b.txt.gz", gzip.compress(b"x" * 5000)), **small) == ({}, {"b.txt.gz": too_big})
    # A sparse 20 GB file: refused from its size, never read (this would not finish otherwise).
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:
        f.truncate(20 << 30)
    assert _read(huge) == ({}, {"huge.txt": "document larger than 64 MB (corpus.sources[].max_doc_mb)"})


def test_a_long_jsonl_line_is_fine_up_to_the_cap(tmp_path):
    text = "w" * (3 << 20)  # 3 MB on one line, well past any read buffer
    path = _write(tmp_path / "long.jsonl", (json.dumps({"text": text}) + "\n").encode())
    assert _read(path, max_doc_mb=4)[0] == {"long.jsonl:1": text}


def test_encoding_errors_reject_or_replace(tmp_path):
    latin = "café au lait".encode("latin-1")
    txt = _write(tmp_path / "a.txt", latin)
    assert _read(txt) == ({}, {"a.txt": "undecodable as UTF-8 at byte 3"})
    assert _read(txt, encoding_errors="replace")[0] == {"a.txt": "caf\ufffd au lait"}
    jsonl = _write(tmp_path / "a.jsonl", b'{"text": "fine"}\n{"text": "' + latin + b'"}\n')
    assert _read(jsonl) == ({"a.jsonl:1": "fine"}, {"a.jsonl:2": "undecodable as UTF-8 at byte 30"})
    assert _read(jsonl, encoding_errors="replace")[0] == {"a.jsonl:1": "fine", "a.jsonl:2": "caf\ufffd au lait"}
    table = _write(tmp_path / "a.csv", b"text\n" + latin + b"\nfine\n")
    assert _read(table) == ({"a.csv:3": "fine"}, {"a.csv:2": "undecodable as UTF-8 at byte 8"})
    assert _read(table, encoding_errors="replace")[0] == {"a.csv:2": "caf\ufffd au lait", "a.csv:3": "fine"}
    page = _write(tmp_path / "a.html", b"<p>" + latin + b"</p>")
    assert _read(page)[1] == {"a.html": "undecodable as UTF-8 at byte 6"}
    assert _read(page, encoding_errors="replace")[0] == {"a.html": "caf\ufffd au lait"}


def test_a_file_that_vanished_after_listing_is_a_reject(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ("keep.txt", "gone.txt"):
        (folder / name).write_text(BODY)
    spec = SourceSpec(name="t", path=str(folder))
    items = read_source(spec)
    first = next(items)  # listing done, first file read
    (folder / "keep.txt" if first.path.endswith("gone.txt") else folder / "gone.txt").unlink()
    second = next(items)
    assert isinstance(first, RawDoc) and second == Reject("t", second.path, VANISHED)
    assert VANISHED.startswith("unreadable: vanished")


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: root reads any file whatever its permission bits, "
                                              "so a permission error cannot be produced")
def test_a_permission_error_is_a_reject(tmp_path):
    path = _write(tmp_path / "secret.txt", BODY.encode())
    path.chmod(0)
    try:
        assert _read(path) == ({}, {"secret.txt": "unreadable: Permission denied"})
    finally:
        path.chmod(0o644)


# -- memory and robustness ------------------------------------------------------------------------

def test_a_30_mb_jsonl_gz_is_streamed_not_loaded(tmp_path):
    import base64

    blob = base64.b64encode(os.urandom(24 << 20)).decode()  # ~32 MB of incompressible text
    lines = [json.dumps({"id": i, "text": blob[i * 8000:(i + 1) * 8000]}) for i in range(len(blob) // 8000)]
    gz = tmp_path / "big.jsonl.gz"
    with gzip.open(gz, "wt", compresslevel=1) as f:
        f.write("\n".join(lines) + "\n")
    plain = _write(tmp_path / "big.jsonl", ("\n".join(lines) + "\n").encode())
    del blob, lines
    assert gz.stat().st_size > 24 << 20
    for path in (gz, plain):
        tracemalloc.start()
        try:
            n = sum(1 for item in read_file(SourceSpec(name="t", path=str(path)), path) if isinstance(item, RawDoc))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert n == 4194
        assert peak < path.stat().st_size / 20, f"{path.name}: peak {peak / 2**20:.1f} MiB"


SAMPLES = {
    ".csv": _csv([["text", "n"], ["a row", "1"]]), ".tsv": b"text\tn\na row\t1\n", ".html": HTML.encode(),
    ".json": b'[{"text": "a"}, {"text": "b"}]', ".jsonl": b'{"text": "a"}\n{"text": "b"}\n',
    ".parquet": _parquet_bytes(pa.table({"text": ["a", "b"]})), ".txt.gz": gzip.compress(BODY.encode()),
    ".jsonl.bz2": bz2.compress(b'{"text": "a"}\n'), ".csv.xz": lzma.compress(b"text\na\n"),
    ".html.zst": zstandard.ZstdCompressor().compress(HTML.encode()), ".tar.zst": zstandard.ZstdCompressor().compress(
        _tar({"a.jsonl": b'{"text": "a"}\n', "b.csv": b"text\nb\n"})), ".zip": _zip({"a.json": b'[{"text": "a"}]'}),
    "": b'{"text": "sniffed"}\n{"text": "lines"}\n',
}


def _mutate(data: bytes, flips: list[tuple[int, int]], cut: int) -> bytes:
    out = bytearray(data)
    for position, value in flips:
        out[position % len(out)] = value
    return bytes(out[: max(1, len(out) - cut)])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ext=st.sampled_from(sorted(SAMPLES)), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                             max_size=6), cut=st.integers(0, 64))
def test_damaged_files_of_every_format_are_accounted_for(tmp_path_factory, ext, flips, cut):
    path = tmp_path_factory.mktemp("fuzz") / f"f{ext}"
    path.write_bytes(_mutate(SAMPLES[ext], flips, cut))
    _read(path)  # never raises, accounts for the file, no two items at one path
