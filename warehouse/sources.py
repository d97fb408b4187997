"""Reading sources into raw documents; every input becomes a document or a reject with a reason."""
from __future__ import annotations

import glob
import json
import os
import stat
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from warehouse.archives import ARCHIVE_SUFFIXES, archive_kind, members

SUPPORTED = {".txt", ".md", ".jsonl"}


class SourceError(ValueError):
    """A source the user declared cannot be read at all (the message says what to fix)."""


@dataclass
class SourceSpec:
    name: str = "corpus"
    path: str = ""  # a file, a folder (read recursively) or a glob
    builtin: str = ""  # "python-docs": the documentation shipped with the interpreter
    text_field: str = "text"  # for .jsonl: the field holding the text (dotted path for nested)


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
    return "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc").strip()


def expand(spec: SourceSpec) -> list[Path]:
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
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if stat.S_ISDIR(mode):
        return "symlink to a folder (not followed)"
    if not stat.S_ISREG(mode):
        return "not a regular file (a device, FIFO or socket)"
    return None


def _field(obj, dotted: str):
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def read_file(spec: SourceSpec, path: Path) -> Iterator[RawDoc | Reject]:
    name = str(path)
    folder = Path(spec.path).expanduser() if spec.path else None
    refusal = _refusal(path, folder if folder is not None and folder.is_dir() else None)
    if refusal:
        yield Reject(spec.name, name, refusal)
        return
    kind = archive_kind(path.name)
    if path.suffix.lower() not in SUPPORTED and kind is None:
        yield Reject(spec.name, name, f"unsupported format {path.suffix or '(no extension)'}; supported: "
                     f"{', '.join(sorted(SUPPORTED) + list(ARCHIVE_SUFFIXES))}")
        return
    try:
        data = path.read_bytes()
    except OSError as exc:
        yield Reject(spec.name, name, f"unreadable: {exc.strerror or exc}")
        return
    if kind is None:
        yield from parse(spec, name, path.suffix.lower(), data)
        return
    for member, content, reason in members(data, kind):
        where = f"{name}!{member}" if member else name
        if reason:
            yield Reject(spec.name, where, reason)
        elif PurePosixPath(member).suffix.lower() not in SUPPORTED:
            yield Reject(spec.name, where, f"unsupported format {PurePosixPath(member).suffix or '(no extension)'}")
        else:
            yield from parse(spec, where, PurePosixPath(member).suffix.lower(), content)


def parse(spec: SourceSpec, name: str, suffix: str, data: bytes) -> Iterator[RawDoc | Reject]:
    """The documents in one file's bytes (.txt / .md: the whole text; .jsonl: a field per line)."""
    if b"\x00" in data:
        yield Reject(spec.name, name, "binary content (NUL bytes)")
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        yield Reject(spec.name, name, f"undecodable as UTF-8 at byte {exc.start}")
        return
    if suffix != ".jsonl":
        yield RawDoc(spec.name, name, text)
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            value = _field(json.loads(line), spec.text_field)
        except json.JSONDecodeError as exc:
            yield Reject(spec.name, where, f"malformed JSON: {exc.msg}")
            continue
        except RecursionError:
            yield Reject(spec.name, where, "malformed JSON: nested too deeply")
            continue
        if not isinstance(value, str):
            yield Reject(spec.name, where, f"no string field {spec.text_field!r}")
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # JSON may escape lone surrogates ("\ud800") that no text can hold
            yield Reject(spec.name, where, "invalid Unicode (a lone surrogate escape)")
            continue
        yield RawDoc(spec.name, where, value)


def read_source(spec: SourceSpec) -> Iterator[RawDoc | Reject]:
    if spec.builtin:
        from warehouse.builtin import BUILTINS

        if spec.builtin not in BUILTINS:
            raise SourceError(f"unknown built-in corpus {spec.builtin!r}; available: {', '.join(BUILTINS)}")
        yield from BUILTINS[spec.builtin](spec.name)
        return
    if not spec.path:
        raise SourceError(f"source {spec.name!r} has neither a path nor a builtin; set corpus.sources[].path")
    for path in expand(spec):
        yield from read_file(spec, path)
