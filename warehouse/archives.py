"""Members of .zip and .tar archives, streamed: nothing is extracted to disk or read whole.

A member is handed on only if it is a regular file at a safe relative path; links, devices, nested
archives, absolute or `..` paths (zip slip) and oversized members come back with the reason instead.
A tar is read in stream mode (one pass, so it may come out of a decompressor: .tar.gz, .tar.zst ...);
a zip needs random access, so it comes from a seekable file.

Size caps (decompression bombs): a member stops at MAX_MEMBER_BYTES once decompressed; a compressed
file on disk stops at MAX_MEMBER_BYTES or MAX_RATIO times its own size, whichever is larger (real text
compresses 3-20x; a bomb, thousands of times).
"""
from __future__ import annotations

import stat
import tarfile
import zipfile
import zlib
from pathlib import PurePosixPath
from typing import BinaryIO, Iterator, NamedTuple

from warehouse.formats import STREAM_ERRORS, buffered, short

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tar.zstd")
MAX_MEMBER_BYTES = 256 * 1024 * 1024  # a decompression bomb stops here
MAX_RATIO = 100  # a compressed file on disk may also grow to this many times its size


class Member(NamedTuple):
    name: str
    stream: BinaryIO | None  # readable until the next member is asked for; None when refused
    reason: str | None  # why the member is refused
    size: int  # its stored (compressed) size in the archive


def archive_kind(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(".zip"):
        return "zip"
    return "tar" if lower.endswith(ARCHIVE_SUFFIXES) else None


def decompression_limit(compressed_size: int | None, in_archive: bool) -> int:
    if in_archive or compressed_size is None:
        return MAX_MEMBER_BYTES
    return max(MAX_MEMBER_BYTES, MAX_RATIO * compressed_size)


def bomb(limit: int) -> str:
    return f"decompression bomb (larger than {limit >> 20} MiB once decompressed)"


def unsafe_path(name: str) -> bool:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return not parts or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]


def _check(name: str, size: int) -> str | None:
    if unsafe_path(name):
        return "unsafe member path (absolute or with '..'; zip slip)"
    if archive_kind(name):
        return "nested archive (not read)"
    if size > MAX_MEMBER_BYTES:
        return f"member larger than {MAX_MEMBER_BYTES >> 20} MiB once decompressed"
    return None


def _stream(inner: BinaryIO) -> BinaryIO:
    return buffered(inner, MAX_MEMBER_BYTES, "corrupted archive", f"member larger than {MAX_MEMBER_BYTES >> 20} "
                    "MiB once decompressed")


def members(fileobj: BinaryIO, kind: str) -> Iterator[Member]:
    """The members of a zip (`fileobj` seekable) or tar (read once, in order), each to be read before
    the next is asked for. A damaged archive ends with a member named "" and the reason."""
    try:
        if kind == "zip":
            yield from _zip_members(fileobj)
        else:
            yield from _tar_members(fileobj)
    except (*STREAM_ERRORS, ValueError) as exc:
        yield Member("", None, f"corrupted archive: {short(exc)}", 0)
    except (NotImplementedError, RuntimeError) as exc:  # an unknown compression method, an encrypted zip
        yield Member("", None, f"unreadable archive: {short(exc)}", 0)


def _zip_members(fileobj: BinaryIO) -> Iterator[Member]:
    with zipfile.ZipFile(fileobj) as zf:
        for info in zf.infolist():
            if not info.filename:  # a damaged central directory can hold nameless entries
                yield Member("", None, "archive member without a name", 0)
                continue
            if info.is_dir():
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                yield Member(info.filename, None, "link inside an archive (not followed)", 0)
                continue
            reason = _check(info.filename, info.file_size)
            if reason:
                yield Member(info.filename, None, reason, info.compress_size)
                continue
            try:  # one member's damage (bad local header, encryption) leaves the others readable
                stream = zf.open(info)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as exc:
                yield Member(info.filename, None, f"corrupted archive: {short(exc)}", info.compress_size)
                continue
            except (NotImplementedError, RuntimeError) as exc:
                yield Member(info.filename, None, f"unreadable archive: {short(exc)}", info.compress_size)
                continue
            with stream:
                yield Member(info.filename, _stream(stream), None, info.compress_size)


def _tar_members(fileobj: BinaryIO) -> Iterator[Member]:
    with tarfile.open(fileobj=fileobj, mode="r|") as tf:
        for member in tf:
            if member.isdir():
                continue
            if member.issym() or member.islnk():
                yield Member(member.name, None, "link inside an archive (not followed)", 0)
                continue
            if not member.isfile():
                yield Member(member.name, None, "device or special file inside an archive", 0)
                continue
            reason = _check(member.name, member.size)
            yield Member(member.name, None if reason else _stream(tf.extractfile(member)), reason, member.size)
