"""Members of .zip and .tar(.gz / .bz2 / .xz) archives, read in memory: nothing is extracted to disk.

A member is handed on only if it is a regular file at a safe relative path; links, devices, nested
archives, absolute or `..` paths (zip slip) and oversized members come back with the reason instead.
"""
from __future__ import annotations

import io
import lzma
import stat
import tarfile
import zipfile
import zlib
from pathlib import PurePosixPath
from typing import Iterator

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
MAX_MEMBER_BYTES = 256 * 1024 * 1024  # a decompression bomb stops here


def archive_kind(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(".zip"):
        return "zip"
    return "tar" if lower.endswith(ARCHIVE_SUFFIXES) else None


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


def members(data: bytes, kind: str) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(member name, its bytes or None, the reason it is refused or None)."""
    try:
        if kind == "zip":
            yield from _zip_members(data)
        else:
            yield from _tar_members(data)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, OSError, ValueError,
            zlib.error, lzma.LZMAError) as exc:
        yield "", None, f"corrupted archive: {exc}"
    except (NotImplementedError, RuntimeError) as exc:  # an unknown compression method, an encrypted zip
        yield "", None, f"unreadable archive: {exc}"


def _zip_members(data: bytes) -> Iterator[tuple[str, bytes | None, str | None]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            if not info.filename:  # a damaged central directory can hold nameless entries
                yield "", None, "archive member without a name"
                continue
            if info.is_dir():
                continue
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                yield info.filename, None, "link inside an archive (not followed)"
                continue
            reason = _check(info.filename, info.file_size)
            yield info.filename, None if reason else zf.read(info), reason


def _tar_members(data: bytes) -> Iterator[tuple[str, bytes | None, str | None]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
        for member in tf:
            if member.isdir():
                continue
            if member.issym() or member.islnk():
                yield member.name, None, "link inside an archive (not followed)"
                continue
            if not member.isfile():
                yield member.name, None, "device or special file inside an archive"
                continue
            reason = _check(member.name, member.size)
            yield member.name, None if reason else tf.extractfile(member).read(), reason
