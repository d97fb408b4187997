"""Reading sources into raw documents; every input becomes a document or a reject with a reason.

For files, this module lists a source's files and dispatches each (see `_read`): compressed files
are decompressed as a stream, archives are walked member by member, and each file or member goes to
its format's parser in `formats.py`. Formats come from the content's magic bytes first, then
`SourceSpec.format`, then the file name, then a look at the text (HTML, JSON, JSON lines).
A `dataset:` source (a Hugging Face dataset) is read by `hf_datasets.py` into the same items.
"""
from __future__ import annotations

import glob
import io
import os
import re
import stat
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

from warehouse import archives, formats
from warehouse.formats import Bad, Doc, Unreadable, short

COMPRESSION_KINDS = frozenset(formats.COMPRESSIONS.values())
SUPPORTED = set(formats.EXTENSIONS)  # document formats by extension (plus compressed files and archives)
SUPPORTED_TEXT = " ".join(sorted(SUPPORTED) + sorted(formats.COMPRESSIONS) + list(archives.ARCHIVE_SUFFIXES))
FORMAT_CHOICES = ("auto", *formats.FORMATS)
ENCODING_ERRORS = ("reject", "replace")
VANISHED = "unreadable: vanished (removed after the source was listed)"


class SourceError(ValueError):
    """A source the user declared cannot be read at all (the message says what to fix)."""


@dataclass
class SourceSpec:
    name: str = "corpus"
    path: str = ""  # a file, a folder (read recursively) or a glob
    builtin: str = ""  # "python-docs": the documentation shipped with the interpreter
    # A Hugging Face dataset (warehouse/hf_datasets.py): a folder saved with save_to_disk, or a hub name
    # (owner/name). Exactly one of path, builtin and dataset is set.
    dataset: str = ""
    split: str = ""  # a DatasetDict's or hub dataset's split (empty: train)
    subset: str = ""  # a hub dataset's config name (load_dataset's second argument)
    # The field holding the text: a JSON key (dotted path for nested, list indices allowed: "meta.body",
    # "paragraphs.0"), a CSV / TSV column, a Parquet column (dotted: a struct column's field).
    text_field: str = "text"
    format: str = "auto"  # auto (content, then extension) or one of formats.FORMATS for every file
    max_doc_mb: float = 64.0  # a larger document (a text file, a JSON line, a cell) is rejected unread
    encoding_errors: str = "reject"  # invalid UTF-8: reject the document, or "replace" with U+FFFD and keep it

    def __post_init__(self) -> None:
        check(self)


def check(spec: SourceSpec) -> None:
    """A declaration mistake as one SourceError line naming the key to fix."""
    def where(key: str) -> str:
        return f"corpus.sources[].{key} of source {spec.name!r}"

    if spec.format not in FORMAT_CHOICES:
        raise SourceError(f"unknown format {spec.format!r}; valid: {', '.join(FORMAT_CHOICES)} "
                          f"({where('format')})")
    if spec.encoding_errors not in ENCODING_ERRORS:
        raise SourceError(f"unknown encoding_errors {spec.encoding_errors!r}; valid: {', '.join(ENCODING_ERRORS)} "
                          f"({where('encoding_errors')})")
    if not isinstance(spec.max_doc_mb, (int, float)) or not spec.max_doc_mb > 0:
        raise SourceError(f"max_doc_mb must be a positive number of megabytes, got {spec.max_doc_mb!r} "
                          f"({where('max_doc_mb')})")
    kinds = [key for key in ("path", "builtin", "dataset") if getattr(spec, key)]
    if len(kinds) != 1:
        got = f"sets {' and '.join(kinds)}" if kinds else "sets none of path, builtin and dataset"
        raise SourceError(f"source {spec.name!r} {got}; set exactly one of corpus.sources[].path (files), "
                          ".dataset (a Hugging Face dataset) or .builtin")
    if not spec.dataset:
        extra = next((key for key in ("split", "subset") if getattr(spec, key)), None)
        if extra:  # silently ignored, it would look like it had chosen something
            raise SourceError(f"{extra} applies to a dataset source only; remove it or set dataset ({where(extra)})")
    elif spec.format != "auto":
        raise SourceError(f"format applies to files, not to a dataset (its columns are typed); remove it "
                          f"({where('format')})")


@dataclass
class RawDoc:
    source: str
    path: str
    text: str
    label: str = ""  # set by sources that carry a downstream label


@dataclass
class Reject:
    source: str
    path: str
    reason: str


def normalize(text: str) -> str:
    """NFC, Unix line endings, no control characters but newline and tab, outer whitespace stripped."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    return _CONTROL.sub("", text).strip()


# Unicode category Cc is exactly U+0000-001F and U+007F-009F; one regex pass is ~15x faster than
# asking unicodedata about every character (cleaning was 93% of an ingest's time).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def expand(spec: SourceSpec) -> list[Path]:
    """The files a source reads (for a dataset source: its Arrow files and metadata, see hf_datasets)."""
    if spec.dataset:
        from warehouse import hf_datasets

        return hf_datasets.files(spec)
    raw = spec.path
    p = Path(raw).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(_walk(p))
    if any(ch in raw for ch in "*?["):
        matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
        if not matches:
            raise SourceError(f"corpus glob {raw!r} matches no files; check the pattern in corpus.sources ({spec.name})")
        return matches
    raise SourceError(f"corpus path {raw!r} does not exist; fix corpus.sources ({spec.name}) or pass --set corpus.path=...")


def _walk(root: Path) -> Iterator[Path]:
    """Every entry of a folder that is not a plain subfolder: files, and symlinks, devices, FIFOs and
    sockets too, so that `read_file` can account for each (symlinked folders are listed, not followed)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        yield from (here / name for name in dirnames if (here / name).is_symlink())
        yield from (here / name for name in filenames)


def _refusal(path: Path, root: Path | None) -> str | None:
    """Why an entry must not be opened, if it must not: it could hang (a FIFO, /dev/zero) or leave
    the folder the user named."""
    if path.is_symlink():
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return "broken symlink or symlink loop"
        if root is not None and not target.is_relative_to(root.resolve()):
            return f"symlink pointing outside the source folder (to {target})"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return VANISHED
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if stat.S_ISDIR(mode):
        return "symlink to a folder (not followed)"
    if not stat.S_ISREG(mode):
        return "not a regular file (a device, FIFO or socket)"
    return None


def read_file(spec: SourceSpec, path: Path) -> Iterator[RawDoc | Reject]:
    """The documents of one file (several for a record format or an archive), or the rejects."""
    check(spec)
    name = str(path)
    folder = Path(spec.path).expanduser() if spec.path else None
    refusal = _refusal(path, folder if folder is not None and folder.is_dir() else None)
    if refusal:
        yield Reject(spec.name, name, refusal)
        return
    try:
        f = open(path, "rb", buffering=formats.BUFFER)
    except FileNotFoundError:
        yield Reject(spec.name, name, VANISHED)
        return
    except OSError as exc:
        yield Reject(spec.name, name, f"unreadable: {exc.strerror or exc}")
        return
    with f:
        items = _read(spec, name, path.name, f, os.fstat(f.fileno()).st_size, name, False, False)
        for item in _guarded(name, items):
            if isinstance(item, Doc):
                yield RawDoc(spec.name, item.where, item.text)
            else:
                yield Reject(spec.name, item.where, item.reason)


def _guarded(where: str, items: Iterator[Doc | Bad]) -> Iterator[Doc | Bad]:
    """A stream failing part-way becomes a reject of its file or member (after the documents before it)."""
    try:
        yield from items
    except Unreadable as exc:
        yield Bad(where, exc.reason)
    except OSError as exc:
        yield Bad(where, f"unreadable: {exc.strerror or short(exc)}")


def _read(spec: SourceSpec, where: str, filename: str, stream: BinaryIO, size: int | None, file: str | None,
          in_archive: bool, decompressed: bool, claimed: str | None = None) -> Iterator[Doc | Bad]:
    """Dispatch one stream: the content's magic bytes first (compression, archive, Parquet), then the
    explicit `format`, then the name, then a look at the text. `filename` is the base name the format is
    read from; `claimed`: a compression the name promised but the content lacked."""
    head = stream.peek(formats.BUFFER)[:formats.BUFFER]
    kind, named = formats.sniff(head), formats.format_of(filename)
    if kind in COMPRESSION_KINDS:
        if decompressed:
            yield Bad(where, "nested compression (not read)")
            return
        limit = archives.decompression_limit(size, in_archive)
        inner = formats.buffered(formats.decompressor(stream, kind), limit, f"corrupt {kind} data",
                                 archives.bomb(limit))
        yield from _read(spec, where, formats.strip_compression(filename), inner, None, None, in_archive, True)
        return
    if kind in ("zip", "tar") or (kind is None and named in ("zip", "tar")):
        if in_archive:
            yield Bad(where, "nested archive (not read)")
            return
        yield from _read_archive(spec, where, kind or named, stream)
        return
    if named in COMPRESSION_KINDS:  # not compressed after all (e.g. saved already decompressed): read what is inside
        yield from _read(spec, where, formats.strip_compression(filename), stream, size, file, in_archive, decompressed,
                         named)
        return
    if spec.format != "auto":
        fmt = spec.format
    elif kind == "parquet" or named in formats.FORMATS:
        fmt = kind or named
    else:
        fmt = formats.sniff_text(head)
    if fmt is None:
        yield Bad(where, _unknown(filename, head, claimed))
        return
    yield from formats.parse(spec, where, fmt, stream, size, file)


def _unknown(filename: str, head: bytes, claimed: str | None) -> str:
    if claimed:
        return f"corrupt {claimed} data (no {claimed} header)"
    suffix = PurePosixPath(filename).suffix
    if not suffix and b"\x00" in head:
        return "binary content (NUL bytes; no extension and not a known format)"
    return f"unsupported format {suffix or '(no extension)'}; supported: {SUPPORTED_TEXT}"


def _read_archive(spec: SourceSpec, where: str, kind: str, stream: BinaryIO) -> Iterator[Doc | Bad]:
    if kind == "zip" and not stream.seekable():  # a zip inside a compressed file: random access needs memory
        data = formats.read_whole(stream, None, archives.MAX_MEMBER_BYTES)
        if data is None:
            yield Bad(where, f"zip archive larger than {archives.MAX_MEMBER_BYTES >> 20} MiB inside a compressed "
                             "file (not read)")
            return
        stream = io.BytesIO(data)
    n = 0
    for n, member in enumerate(archives.members(stream, kind), 1):
        at = f"{where}!{member.name}" if member.name else where
        if member.reason:
            yield Bad(at, member.reason)
            continue
        basename = PurePosixPath(member.name).name
        yield from _guarded(at, _read(spec, at, basename, member.stream, member.size, None, True, False))
    if n == 0:  # folders only, or nothing: still accounted for
        yield Bad(where, "empty archive (no files in it)")


def read_source(spec: SourceSpec) -> Iterator[RawDoc | Reject]:
    if spec.builtin:
        from warehouse.builtin import BUILTINS

        if spec.builtin not in BUILTINS:
            raise SourceError(f"unknown built-in corpus {spec.builtin!r}; available: {', '.join(BUILTINS)}")
        yield from BUILTINS[spec.builtin](spec.name)
        return
    check(spec)  # exactly one of path, builtin, dataset
    if spec.dataset:
        from warehouse.hf_datasets import read_dataset  # imports `datasets` (2 s), only when one is declared

        yield from read_dataset(spec)
        return
    for path in expand(spec):
        yield from read_file(spec, path)
