"""Token shards: each split of a snapshot as one flat file of token ids plus document offsets.

    <split>.tokens.bin    the token ids of the split's documents back to back, raw little-endian
                          uint16 (a vocabulary of at most 65,536) or uint32: np.memmap reads it in place
    <split>.offsets.npy   int64, n_docs + 1 boundaries into the tokens
    meta.json             dtype, counts, snapshot id, tokenizer sha256; written last

Written streaming, so memory stays flat in the corpus size: texts come from DuckDB in batches
(`iter_texts`), are encoded on every core (`encode_batch_fast` runs Rust threads; setting
TOKENIZERS_PARALLELISM=false turns them off), and are appended to a temporary file renamed into
place once the split is complete. A killed run leaves no shard that looks complete: meta.json goes
first and comes back last, and `load_split` refuses a folder without it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from tokenizers import Tokenizer

from warehouse.store import SPLITS, WarehouseError, connect, iter_texts, snapshot_info

META = "meta.json"
# Text per encode_batch_fast call: its Encodings (ids, tokens, masks...) take ~20 bytes a character.
ENCODE_CHARS = 4 * 2**20
TMP = ".tmp"  # suffix of a file being written; never read as a shard


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32).newbyteorder("<")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _replace(tmp: Path, final: Path) -> None:
    """Durable, atomic rename: the file's bytes reach the disk before its name does."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(final)


def _chunks(batches: Iterator[list[str]], max_chars: int) -> Iterator[list[str]]:
    """The texts again, in lists of at most `max_chars` characters (or one longer text)."""
    chunk, n = [], 0
    for batch in batches:
        for text in batch:
            if chunk and n + len(text) > max_chars:
                yield chunk
                chunk, n = [], 0
            chunk.append(text)
            n += len(text)
    if chunk:
        yield chunk


def _encoded(tok: Tokenizer, texts: Iterator[list[str]], dtype: np.dtype) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(token ids of a chunk of documents as one array, their lengths)."""
    for chunk in _chunks(texts, ENCODE_CHARS):
        ids = [np.array(enc.ids, dtype=dtype) for enc in tok.encode_batch_fast(chunk, add_special_tokens=False)]
        yield np.concatenate(ids), np.array([len(x) for x in ids], dtype=np.int64)


def write_split(tok: Tokenizer, texts: Iterator[list[str]], out: Path, split: str, dtype: np.dtype) -> dict:
    """Streams one split to `<split>.tokens.bin` and `<split>.offsets.npy`; returns its counts."""
    tokens_tmp, offsets_tmp = out / f"{split}.tokens.bin{TMP}", out / f"{split}.offsets.npy{TMP}"
    lengths = [np.zeros(1, dtype=np.int64)]  # 8 bytes a document: small next to the tokens
    with open(tokens_tmp, "wb") as f:
        for flat, chunk_lengths in _encoded(tok, texts, dtype):
            f.write(flat.data)
            lengths.append(chunk_lengths)
    offsets = np.cumsum(np.concatenate(lengths))
    with open(offsets_tmp, "wb") as f:
        np.save(f, offsets)
    _replace(tokens_tmp, out / f"{split}.tokens.bin")
    _replace(offsets_tmp, out / f"{split}.offsets.npy")
    return {"documents": len(offsets) - 1, "tokens": int(offsets[-1])}


def _rows_per_fetch(db_path: str | Path, snapshot_id: str) -> int:
    """Documents per DuckDB fetch: about ENCODE_CHARS of text at the snapshot's mean document length."""
    with connect(db_path, read_only=True) as con:
        info = snapshot_info(con, snapshot_id)
    mean = max(1, (info.n_chars or 0) // max(1, info.n_documents))
    return int(min(4096, max(1, ENCODE_CHARS // mean)))


def write_token_shards(db_path: str | Path, snapshot_id: str, tokenizer_path: str | Path, out_dir: str | Path) -> dict:
    """Writes every split of the snapshot (see the module docstring); returns {split: counts}."""
    batch = _rows_per_fetch(db_path, snapshot_id)
    tok = Tokenizer.from_file(str(tokenizer_path))
    dtype = token_dtype(tok.get_vocab_size())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)  # the folder is incomplete until the new meta.json lands
    counts = {split: write_split(tok, iter_texts(db_path, snapshot_id, split, batch), out, split, dtype)
              for split in SPLITS}
    meta = {"snapshot_id": snapshot_id, "dtype": dtype.str, "tokenizer_sha256": file_sha256(tokenizer_path),
            "vocab_size": tok.get_vocab_size(), "splits": counts}
    tmp = out / f"{META}{TMP}"
    tmp.write_text(json.dumps(meta, indent=2))
    _replace(tmp, out / META)
    return counts


def load_split(shard_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, offsets) of one split: the tokens a read-only memmap, the offsets in memory (int64)."""
    d = Path(shard_dir)
    try:
        meta = json.loads((d / META).read_text())
    except (OSError, ValueError):
        raise WarehouseError(f"no complete token shards in {d} (meta.json missing or unreadable); "
                             "run the token-shards stage again") from None
    if "dtype" not in meta:  # the first layout: one .npy per split, also written before its meta.json
        return np.load(d / f"{split}.tokens.npy", mmap_mode="r"), np.load(d / f"{split}.offsets.npy")
    counts, dtype = meta["splits"][split], np.dtype(meta["dtype"])
    path = d / f"{split}.tokens.bin"
    size = path.stat().st_size if path.exists() else -1
    if size != counts["tokens"] * dtype.itemsize:
        raise WarehouseError(f"token shard {path} holds {size} bytes, meta.json says {counts['tokens']} tokens of "
                             f"{dtype}; delete {d} and run the token-shards stage again")
    offsets = np.load(d / f"{split}.offsets.npy")
    if len(offsets) != counts["documents"] + 1 or (len(offsets) and offsets[-1] != counts["tokens"]):
        raise WarehouseError(f"{d / f'{split}.offsets.npy'} does not match meta.json; delete {d} and run the "
                             "token-shards stage again")
    if counts["tokens"] == 0:  # an empty file cannot be memory-mapped
        tokens = np.empty(0, dtype=dtype)
        tokens.flags.writeable = False
    else:
        tokens = np.memmap(path, dtype=dtype, mode="r", shape=(counts["tokens"],))
    return tokens, offsets
