"""Example rows on disk and the batches drawn from them.

The warehouse writes each split as a flat token array plus document offsets; an objective turns
that into fixed-length rows (`<split>.npy`, uint16/uint32), read here through a memory map.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


WORD_STARTS_FILE = "word_starts.npy"
WORD_MARKERS = ("\u0120", "\u010a", "\u2581")  # byte-level BPE's space and newline, Metaspace's space


def word_starts(tokenizer_path: str | Path) -> np.ndarray:
    """A bool per vocabulary id: does this token begin a word? (What whole-word masking groups by.)

    WordPiece marks continuations with `##`; byte-level BPE and Metaspace mark word starts with
    their space symbol. Tokens that begin with punctuation also start a word, as BERT's
    pre-tokeniser splits punctuation off.
    """
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_path)).get_vocab(with_added_tokens=True)
    table = np.zeros(max(vocab.values()) + 1, dtype=bool)
    wordpiece = any(t.startswith("##") for t in vocab)
    for token, i in vocab.items():
        if wordpiece:
            table[i] = not token.startswith("##")
        else:
            table[i] = token.startswith(WORD_MARKERS) or not token[:1].isalnum()
    return table


def pack_stream(tokens: np.ndarray, offsets: np.ndarray, sep_id: int) -> np.ndarray:
    """Concatenate documents with a separator after each one (offsets: n_docs + 1 boundaries)."""
    return np.insert(tokens, offsets[1:], sep_id).astype(tokens.dtype, copy=False)


def chunk_rows(stream: np.ndarray, row_len: int, stride: int) -> np.ndarray:
    """Non-overlapping (stride == row_len) or one-token-overlapping rows; the ragged tail is dropped."""
    if len(stream) < row_len:
        return np.empty((0, row_len), dtype=stream.dtype)
    n = (len(stream) - row_len) // stride + 1
    idx = np.arange(n)[:, None] * stride + np.arange(row_len)[None, :]
    return stream[idx]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def save_rows(path: Path, rows: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, rows)
    tmp.replace(path)


def load_rows(data_dir: str | Path, split: str) -> np.ndarray:
    path = Path(data_dir) / f"{split}.npy"
    if not path.exists():
        raise FileNotFoundError(f"no examples for split {split!r} at {path}; run the examples stage first")
    return np.load(path, mmap_mode="r")


@dataclass
class LoaderState:
    epoch: int = 0
    position: int = 0  # rows consumed in the current epoch


class RowLoader:
    """Shuffled batches of rows, a fresh permutation each epoch, resumable from `state`."""

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int, state: LoaderState | None = None):
        if len(rows) < batch_size:
            raise ValueError(
                f"only {len(rows)} training examples for batch_size={batch_size}; "
                "use a larger corpus or lower train.batch_size / train.seq_len"
            )
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.state = state or LoaderState()

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(len(self.rows))

    def next_batch(self) -> torch.Tensor:
        if self.state.position + self.batch_size > len(self.rows):
            self.state = LoaderState(self.state.epoch + 1, 0)
        order = self._order(self.state.epoch)
        idx = np.sort(order[self.state.position : self.state.position + self.batch_size])
        self.state.position += self.batch_size
        return torch.from_numpy(self.rows[idx].astype(np.int64))


def eval_batches(rows: np.ndarray, batch_size: int, max_batches: int):
    """The first `max_batches` batches in order: the same rows for every model and every eval."""
    for start in range(0, min(len(rows), batch_size * max_batches), batch_size):
        yield torch.from_numpy(rows[start : start + batch_size].astype(np.int64))
