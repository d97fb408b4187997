"""Corpus file formats: content sniffing, streamed decompression, and one parser per format.

Why a module of its own: `sources.py` decides which parser a file (or archive member) gets, by its
content first and its name second; the parsers here turn one buffered binary stream into
`Doc(where, text)` and `Bad(where, reason)` items, which `sources.py` makes into RawDoc / Reject rows.

Memory: every parser streams (JSON lines and CSV line by line, Parquet by record batches, text
documents read with a cap), except where a format has to be read whole: a .json file, and a Parquet
file that arrives compressed or inside an archive; those are read up to MAX_WHOLE_BYTES.

Formats: txt / md / rst (the file is one document), html (text extracted with selectolax), jsonl, json,
csv / tsv (one document per record, the text at `SourceSpec.text_field`), parquet (a column).
"""
from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import re
import tarfile
import zipfile
import zlib
from typing import TYPE_CHECKING, BinaryIO, Iterator, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from selectolax.lexbor import LexborHTMLParser

if TYPE_CHECKING:
    from warehouse.sources import SourceSpec

FORMATS = ("txt", "md", "rst", "html", "jsonl", "json", "csv", "tsv", "parquet")
EXTENSIONS = {".txt": "txt", ".text": "txt", ".md": "md", ".markdown": "md", ".rst": "rst", ".html": "html",
              ".htm": "html", ".xhtml": "html", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
              ".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet"}
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}
BUFFER = 1 << 16  # read-ahead of every stream; also how much of a file the sniffers see
MAX_WHOLE_BYTES = 256 * 1024 * 1024  # a format that must be read whole (.json) stops here
BOM = b"\xef\xbb\xbf"
# What a decompressor or an archive reader raises on damaged data (bz2 and gzip raise OSError).
STREAM_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError, zipfile.BadZipFile,
                 tarfile.TarError)

csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # a document may be one long cell


class Doc(NamedTuple):
    where: str
    text: str


class Bad(NamedTuple):
    where: str
    reason: str


class Unreadable(Exception):
    """A stream failed part-way (damaged, or past its size cap); `reason` is the reject reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def short(exc: BaseException, limit: int = 120) -> str:
    """An exception as a one-line reason fragment (parser messages may hold newlines)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def too_large(spec: SourceSpec) -> str:
    return f"document larger than {spec.max_doc_mb:g} MB (corpus.sources[].max_doc_mb)"


# -- streams --------------------------------------------------------------------------------------

class Limited(io.RawIOBase):
    """A readable over a decompressor or archive member that stops at `limit` bytes and turns the
    reader's own errors into `Unreadable(corrupt: ...)`. Reads are filled completely (decompressors may
    return short reads), so a BufferedReader on top can `peek` a full buffer for sniffing."""

    def __init__(self, inner: BinaryIO, limit: int, corrupt: str, over_limit: str):
        self.inner, self.limit, self.corrupt, self.over_limit, self.count = inner, limit, corrupt, over_limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view, n = memoryview(buffer).cast("B"), 0
        while n < len(view):
            try:
                chunk = self.inner.read(len(view) - n)
            except STREAM_ERRORS as exc:
                raise Unreadable(f"{self.corrupt} ({short(exc)})") from None
            if not chunk:
                break
            view[n:n + len(chunk)] = chunk
            n += len(chunk)
        self.count += n
        if self.count > self.limit:
            raise Unreadable(self.over_limit)
        return n


def buffered(inner: BinaryIO, limit: int, corrupt: str, over_limit: str) -> io.BufferedReader:
    return io.BufferedReader(Limited(inner, limit, corrupt, over_limit), BUFFER)


class _Zstd(io.RawIOBase):
    """zstd frames, decompressed a little input at a time. zstandard's own stream readers accept a
    truncated stream silently; this raises EOFError for one. A step feeds 64 compressed bytes, which
    bounds its output to 2 MiB (16 blocks of 128 KiB, the most even run-length blocks can hold) at
    ~100 MB/s of text decompressed."""

    STEP = 64

    def __init__(self, raw: BinaryIO):
        self.raw, self.dctx, self.obj = raw, zstandard.ZstdDecompressor(), None
        self.pending, self.pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.pos >= len(self.pending):
            data = self.raw.read(self.STEP)
            if not data:
                if self.obj is not None:  # input ended inside a frame
                    raise EOFError("zstd data ended before the end of a frame")
                return 0
            out = []
            while data:
                self.obj = self.obj or self.dctx.decompressobj()
                out.append(self.obj.decompress(data))
                data, self.obj = (self.obj.unused_data, None) if self.obj.eof else (b"", self.obj)
            self.pending, self.pos = b"".join(out), 0
        n = min(len(buffer), len(self.pending) - self.pos)
        buffer[:n] = self.pending[self.pos:self.pos + n]
        self.pos += n
        return n


def decompressor(stream: BinaryIO, kind: str) -> BinaryIO:
    """A reader of the decompressed bytes of `stream` (gzip, bz2, xz or zstd; several members or frames)."""
    if kind == "gzip":
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if kind == "bz2":
        return bz2.BZ2File(stream)
    if kind == "xz":
        return lzma.LZMAFile(stream)
    return _Zstd(stream)


# -- detection ------------------------------------------------------------------------------------

def sniff(head: bytes) -> str | None:
    """A container or binary format from its magic bytes: gzip, bz2, xz, zstd, zip, tar or parquet."""
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"BZh") and head[3:4] in (b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"8", b"9"):
        return "bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head[257:262] == b"ustar":
        return "tar"
    if head.startswith(b"PAR1"):
        return "parquet"
    return None


def sniff_text(head: bytes) -> str | None:
    """html, json or jsonl from the start of a text file, for a file whose name does not say."""
    if re.search(rb"<!doctype\s+html|<html[\s>]", head[:1024], re.IGNORECASE):
        return "html"
    body = head.removeprefix(BOM).lstrip()
    if body[:1] == b"[":
        return "json"
    if body[:1] == b"{":
        first, newline, _ = body.partition(b"\n")
        try:  # a whole JSON object on the first line, more after it: JSON lines
            return "jsonl" if newline and isinstance(json.loads(first), dict) else "json"
        except (ValueError, RecursionError):
            return "json"
    return None


def format_of(name: str) -> str | None:
    """What a file name says: a document format, a compression (gzip ...), or an archive (zip, tar)."""
    lower = name.lower()
    if lower.endswith((".tar", ".zip")):
        return lower[-3:]
    if lower.endswith(".tgz"):
        return "gzip"
    suffix = lower[lower.rfind("."):] if "." in lower else ""
    return COMPRESSIONS.get(suffix) or EXTENSIONS.get(suffix)  # a.tar.gz: gzip, then a.tar: tar


def strip_compression(name: str) -> str:
    """The name of what is inside a compressed file: a.jsonl.gz -> a.jsonl, b.tgz -> b.tar."""
    lower = name.lower()
    if lower.endswith(".tgz"):
        return name[:-4] + ".tar"
    for suffix in COMPRESSIONS:
        if lower.endswith(suffix):
            return name[:-len(suffix)]
    return name


# -- decoding -------------------------------------------------------------------------------------

def decode(data: bytes, spec: SourceSpec, offset: int = 0) -> tuple[str | None, str | None]:
    """(text, None), or (None, reason) under encoding_errors = reject. `offset`: where `data` starts."""
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        if spec.encoding_errors == "replace":
            return data.decode("utf-8", "replace"), None
        return None, f"undecodable as UTF-8 at byte {offset + exc.start}"


def read_whole(stream: BinaryIO, size: int | None, cap: int) -> bytes | None:
    """The stream's bytes, or None when there are more than `cap` (never reading more than cap + 1)."""
    if size is not None and size > cap:
        return None
    chunks, total = [], 0
    while total <= cap:  # in pieces: read(cap + 1) would allocate the whole cap up front
        chunk = stream.read(min(16 * BUFFER, cap + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return None if total > cap else b"".join(chunks)


def _text_of(spec: SourceSpec, where: str, stream: BinaryIO, size: int | None) -> tuple[str | None, Bad | None]:
    data = read_whole(stream, size, int(spec.max_doc_mb * 1_000_000))
    if data is None:
        return None, Bad(where, too_large(spec))
    if b"\x00" in data:
        return None, Bad(where, "binary content (NUL bytes)")
    offset = len(BOM) if data.startswith(BOM) else 0
    text, reason = decode(data[offset:], spec, offset)
    return text, Bad(where, reason) if reason else None


# -- parsers --------------------------------------------------------------------------------------

def parse(spec: SourceSpec, where: str, fmt: str, stream: BinaryIO, size: int | None,
          file: str | None = None) -> Iterator[Doc | Bad]:
    """The documents of one file or member in format `fmt`. `size`: its byte size when known; `file`:
    its path when `stream` is a plain file on disk (Parquet then reads it in place)."""
    if fmt == "parquet":
        yield from parse_parquet(spec, where, stream, file)
    elif stream.peek(BUFFER)[:BUFFER].startswith((b"\xff\xfe", b"\xfe\xff")):
        yield Bad(where, "undecodable as UTF-8 (UTF-16 text; re-save it as UTF-8)")
    elif fmt in ("jsonl", "csv", "tsv") and b"\x00" in stream.peek(BUFFER)[:BUFFER]:
        yield Bad(where, "binary content (NUL bytes)")
    elif fmt == "jsonl":
        yield from parse_jsonl(spec, where, stream)
    elif fmt in ("csv", "tsv"):
        yield from parse_delimited(spec, where, stream, fmt)
    elif fmt == "json":
        yield from parse_json(spec, where, stream, size)
    elif fmt == "html":
        yield from parse_html(spec, where, stream, size)
    else:
        text, bad = _text_of(spec, where, stream, size)
        yield bad or Doc(where, text)


def parse_html(spec: SourceSpec, where: str, stream: BinaryIO, size: int | None) -> Iterator[Doc | Bad]:
    markup, bad = _text_of(spec, where, stream, size)
    if bad:
        yield bad
        return
    text = html_text(markup)
    yield Doc(where, text) if text else Bad(where, "empty after cleaning (no text in the HTML)")


DROPPED = ["script", "style", "noscript", "template", "svg", "iframe", "object"]
BLOCKS = frozenset(("address article aside blockquote body caption dd details dialog div dl dt fieldset figcaption "
                    "figure footer form h1 h2 h3 h4 h5 h6 header hgroup hr legend li main nav ol p pre section "
                    "summary table tbody tfoot thead tr ul").split())
_HTML_SPACE = re.compile(r"[ \t\n\r\f]+")  # HTML collapses these; a no-break space stays


def html_text(markup: str) -> str:
    """The visible text of an HTML page: scripts, styles and the like dropped, runs of whitespace
    collapsed (except inside <pre>), one line per block element (paragraph, heading, list item ...)."""
    tree = LexborHTMLParser(markup)
    tree.strip_tags(DROPPED)
    if tree.body is None:
        return ""
    out: list[str] = []

    def newline() -> None:
        if out and not out[-1].endswith("\n"):
            out[-1] = out[-1].rstrip(" ")
            out.append("\n")

    # Depth-first with an explicit stack (deeply nested pages would exhaust Python's recursion).
    stack = [(tree.body, False, False)]  # (node, leaving it, inside <pre>)
    while stack:
        node, leaving, pre = stack.pop()
        if leaving:
            newline()
        elif node.is_text_node:
            text = node.text_content or ""
            if not pre:
                text = _HTML_SPACE.sub(" ", text)
                if text.startswith(" ") and (not out or out[-1].endswith(("\n", " "))):
                    text = text[1:]
            if text:
                out.append(text)
        elif node.is_element_node:
            tag = node.tag
            if tag == "br":
                out.append("\n")
                continue
            if tag in ("td", "th") and out and not out[-1].endswith(("\n", " ")):
                out.append(" ")
            if tag in BLOCKS:
                newline()
                stack.append((node, True, pre))
            inside = pre or tag in ("pre", "textarea")
            stack.extend((child, False, inside) for child in reversed(list(node.iter(include_text=True))))
    return "".join(out).strip()


def field(obj, path: str):
    """The value at a dotted path ("meta.body", "paragraphs.0"), or None. A key holding the dots
    itself ("meta.body" as one key) wins."""
    if isinstance(obj, dict) and path in obj:
        return obj[path]
    for part in path.split("."):
        if isinstance(obj, dict) and part in obj:
            obj = obj[part]
        elif isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        else:
            return None
    return obj


def _record(spec: SourceSpec, where: str, value) -> Doc | Bad:
    """A record's text (`value` is the record's value at text_field) or why there is none."""
    if not isinstance(value, str):
        return Bad(where, f"no string field {spec.text_field!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON may escape lone surrogates ("\ud800") that no text can hold
        return Bad(where, "invalid Unicode (a lone surrogate escape)")
    if len(value) > spec.max_doc_mb * 1_000_000:
        return Bad(where, too_large(spec))
    return Doc(where, value)


def _lines(stream: BinaryIO, cap: int) -> Iterator[tuple[int, int, bytes | None]]:
    """(line number, byte offset, the line or None when longer than `cap`), reading line by line;
    an over-long line is skipped in pieces, never held whole."""
    offset, lineno = 0, 0
    while line := stream.readline(cap + 1):
        lineno += 1
        start = offset
        offset += len(line)
        if len(line) > cap and not line.endswith(b"\n"):
            while (rest := stream.readline(BUFFER)) and not rest.endswith(b"\n"):
                offset += len(rest)
            offset += len(rest)
            yield lineno, start, None
            continue
        if lineno == 1 and line.startswith(BOM):
            line, start = line[len(BOM):], len(BOM)
        yield lineno, start, line


def parse_jsonl(spec: SourceSpec, where: str, stream: BinaryIO) -> Iterator[Doc | Bad]:
    """One record per line; blank lines skipped. A line may be as long as max_doc_mb."""
    n = 0
    for lineno, offset, line in _lines(stream, int(spec.max_doc_mb * 1_000_000)):
        at = f"{where}:{lineno}"
        if line is None:
            n += 1
            yield Bad(at, too_large(spec))
            continue
        if not line.strip():
            continue
        n += 1
        text, reason = decode(line, spec, offset)
        if reason:
            yield Bad(at, reason)
            continue
        try:
            value = field(json.loads(text), spec.text_field)
        except json.JSONDecodeError as exc:
            yield Bad(at, f"malformed JSON: {exc.msg}")
            continue
        except RecursionError:
            yield Bad(at, "malformed JSON: nested too deeply")
            continue
        yield _record(spec, at, value)
    if n == 0:
        yield Bad(where, "no records (empty file)")


def parse_json(spec: SourceSpec, where: str, stream: BinaryIO, size: int | None) -> Iterator[Doc | Bad]:
    """A JSON document read whole: an array of records, an object holding one list of records, or one
    record (an object with text_field). JSON lines under a .json name are read as JSON lines."""
    data = read_whole(stream, size, MAX_WHOLE_BYTES)
    if data is None:
        yield Bad(where, f"JSON file larger than {MAX_WHOLE_BYTES >> 20} MiB (a .json file is read whole; "
                         "convert it to JSON lines)")
        return
    text, reason = decode(data.removeprefix(BOM), spec)
    if reason:
        yield Bad(where, reason)
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):  # one object, then another: JSON lines
            yield from parse_jsonl(spec, where, io.BytesIO(data))
            return
        yield Bad(where, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
        return
    except RecursionError:
        yield Bad(where, "malformed JSON: nested too deeply")
        return
    if isinstance(obj, dict) and field(obj, spec.text_field) is not None:
        yield _record(spec, where, field(obj, spec.text_field))
        return
    records = obj
    if isinstance(obj, dict):
        lists = [value for value in obj.values() if isinstance(value, list)]
        if len(lists) != 1:
            keys = ", ".join(repr(k) for k in list(obj)[:20]) or "none"
            yield Bad(where, f"no records (a JSON object with neither a {spec.text_field!r} field nor one list "
                             f"of records; its keys: {keys}); set corpus.sources[].text_field")
            return
        records = lists[0]
    if not isinstance(records, list):
        yield Bad(where, f"no records (the JSON document is a {type(obj).__name__}, not an array of records)")
        return
    if not records:
        yield Bad(where, "no records (an empty JSON array)")
    for i, record in enumerate(records):
        yield _record(spec, f"{where}#{i}", field(record, spec.text_field))


class _DecodedLines:
    """Decoded lines for csv.reader, noting the lines that were undecodable or too long (those are
    handed on blank or with U+FFFD, so the reader keeps its place, and their row is rejected)."""

    def __init__(self, spec: SourceSpec, stream: BinaryIO):
        self.spec, self.problems = spec, {}
        self.lines = _lines(stream, int(spec.max_doc_mb * 1_000_000))

    def __iter__(self):
        return self

    def __next__(self) -> str:
        lineno, offset, line = next(self.lines)
        if line is None:
            self.problems[lineno] = too_large(self.spec)
            return "\n"
        text, reason = decode(line, self.spec, offset)
        if reason:
            self.problems[lineno] = reason
            return line.decode("utf-8", "replace")
        return text

    def problem(self, first: int, last: int) -> str | None:
        return next((self.problems.pop(n) for n in range(first, last + 1) if n in self.problems), None)


def parse_delimited(spec: SourceSpec, where: str, stream: BinaryIO, fmt: str) -> Iterator[Doc | Bad]:
    """CSV / TSV with a header row; a document per row from the column named by text_field."""
    kind = fmt.upper()
    lines = _DecodedLines(spec, stream)
    reader = csv.reader(lines, delimiter="," if fmt == "csv" else "\t", strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        yield Bad(where, f"malformed {kind} header ({short(exc)})")
        return
    if header is None:
        yield Bad(where, "no records (empty file)")
        return
    problem = lines.problem(1, reader.line_num)
    if problem:
        yield Bad(where, f"{problem} (in the header)")
        return
    header = [name.strip() for name in header]
    if spec.text_field not in header:
        have = ", ".join(repr(c) for c in header[:30]) + (", ..." if len(header) > 30 else "") or "none"
        yield Bad(where, f"no column {spec.text_field!r} (its columns: {have}); set corpus.sources[].text_field")
        return
    column, n = header.index(spec.text_field), 0
    while True:
        first = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            lines.problem(first, reader.line_num)
            n += 1
            yield Bad(f"{where}:{first}", f"malformed {kind} row ({short(exc)})")
            continue
        problem = lines.problem(first, reader.line_num)
        if problem:
            n += 1
            yield Bad(f"{where}:{first}", problem)
        elif row:  # an empty row is a blank line
            n += 1
            if len(row) != len(header):
                yield Bad(f"{where}:{first}", f"malformed {kind} row ({len(row)} fields where the header has "
                                              f"{len(header)}; quote cells holding the delimiter)")
            else:
                yield _record(spec, f"{where}:{first}", row[column])
    if n == 0:
        yield Bad(where, "no records (a header row only)")


def parse_parquet(spec: SourceSpec, where: str, stream: BinaryIO, file: str | None) -> Iterator[Doc | Bad]:
    """The column text_field (a struct column's field for a dotted path), read a record batch at a time.
    A Parquet file needs random access: on disk it is read in place; compressed or inside an archive it
    is first read into memory, up to MAX_WHOLE_BYTES."""
    source = file
    if source is None:
        data = read_whole(stream, None, MAX_WHOLE_BYTES)
        if data is None:
            yield Bad(where, f"Parquet data larger than {MAX_WHOLE_BYTES >> 20} MiB inside an archive or compressed "
                             "file (store the .parquet file as it is)")
            return
        source = pa.BufferReader(data)
    try:
        parquet = pq.ParquetFile(source)
        names = parquet.schema_arrow.names
        top, _, rest = (spec.text_field, "", "") if spec.text_field in names else spec.text_field.partition(".")
        if top not in names:
            have = ", ".join(repr(c) for c in names[:30]) + (", ..." if len(names) > 30 else "") or "none"
            yield Bad(where, f"no column {spec.text_field!r} (its columns: {have}); set corpus.sources[].text_field")
            return
        kind = parquet.schema_arrow.field(top).type
        if not rest and not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            yield Bad(where, f"column {top!r} is not text ({kind}); set corpus.sources[].text_field")
            return
        row = 0
        for batch in parquet.iter_batches(batch_size=256, columns=[top]):
            for value in batch.column(0).to_pylist():
                yield _record(spec, f"{where}#{row}", field(value, rest) if rest else value)
                row += 1
    except (pa.ArrowException, OSError, ValueError) as exc:
        yield Bad(where, f"corrupt parquet data ({short(exc)})")
        return
    if row == 0:
        yield Bad(where, "no records (an empty Parquet file)")
