"""Example rows on disk and the batches drawn from them.

The warehouse writes each split as a flat token array plus document offsets; an objective turns
that into fixed-length rows (`<split>.npy`, uint16/uint32), read here through a memory map.
"""
from __future__ import annotations

import contextlib
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
    position: int = 0  # rows consumed in the current epoch, counted over all processes (global)


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, stop) of an n-row batch that process `rank` of `world` holds (contiguous, sizes differ by <= 1)."""
    return n * rank // world, n * (rank + 1) // world


class RowLoader:
    """Shuffled batches of rows, a fresh permutation each epoch, resumable from `state`.

    `batch_size` is the global batch. With several processes each one reads only its contiguous
    slice of every global batch; the permutation and the position do not depend on the number of
    processes, so N processes see together exactly the rows one process would, and a run saved with
    N processes resumes with M at the same place.
    """

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int, state: LoaderState | None = None,
                 rank: int = 0, world: int = 1, pin_memory: bool = False):
        if len(rows) < batch_size:
            raise ValueError(
                f"only {len(rows)} training examples for batch_size={batch_size}; "
                "use a larger corpus or lower train.batch_size / train.seq_len"
            )
        if batch_size % world:
            raise ValueError(f"train.batch_size={batch_size} (the global batch) is not divisible by the {world} "
                             "processes; make it a multiple of the number of processes")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.rank, self.world = rank, world
        # Page-locked batches let `.to(cuda, non_blocking=True)` return at once: from pageable memory
        # the copy would block the host until the device has caught up.
        self.pin_memory = pin_memory
        self.state = state or LoaderState()
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        # Drawn once per epoch: a permutation of millions of rows every step would cost the host more
        # than a small model's step costs the GPU.
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            self._epoch_order = (epoch, np.random.default_rng((self.seed, epoch)).permutation(len(self.rows)))
        return self._epoch_order[1]

    @property
    def window(self) -> tuple[int, int]:
        """This process's rows [start, stop) of every global batch."""
        return shard_bounds(self.batch_size, self.rank, self.world)

    def next_batch(self) -> torch.Tensor:
        if self.state.position + self.batch_size > len(self.rows):
            self.state = LoaderState(self.state.epoch + 1, 0)
        order = self._order(self.state.epoch)
        idx = np.sort(order[self.state.position : self.state.position + self.batch_size])
        self.state.position += self.batch_size
        start, stop = self.window
        batch = torch.from_numpy(self.rows[idx[start:stop]].astype(np.int64))
        return batch.pin_memory() if self.pin_memory else batch


def eval_batches(rows: np.ndarray, batch_size: int, max_batches: int):
    """The first `max_batches` batches in order: the same rows for every model and every eval."""
    for start in range(0, min(len(rows), batch_size * max_batches), batch_size):
        yield torch.from_numpy(rows[start : start + batch_size].astype(np.int64))


# Random draws of the collators (dynamic masks, prefix lengths) are made for the whole global batch
# and sliced to the rows this process holds. A row then gets the same masks whichever process holds
# it and however the batch is split, so N processes train on exactly what one process would; a
# per-process generator stream would give other masks, and the loss curves would drift apart. The
# window is a module-level setting (not an argument) because the draws happen deep inside each
# objective's forward; with no window set (one process, fine-tuning, export) nothing changes.
_window: tuple[int, int, int] | None = None  # (start, stop, rows in the global batch)


@contextlib.contextmanager
def row_window(start: int, stop: int, total: int):
    """Within this block, the batches given to an objective are rows [start, stop) of a `total`-row batch."""
    global _window
    previous, _window = _window, (None if (start, stop) == (0, total) else (start, stop, total))
    try:
        yield
    finally:
        _window = previous


def _global_shape(shape) -> tuple[tuple[int, ...], slice | None]:
    shape = tuple(shape)
    if _window is None:
        return shape, None
    start, stop, total = _window
    if shape[0] != stop - start:
        raise RuntimeError(f"a random draw for {shape[0]} rows inside a window of {stop - start} rows; "
                           "draw per batch row")
    return (total, *shape[1:]), slice(start, stop)


def batch_rand(shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """`torch.rand(shape)` for a batch whose first dimension is rows: the same values per row in any window."""
    full, rows = _global_shape(shape)
    out = torch.rand(full, generator=generator, device=device)
    return out if rows is None else out[rows]


def batch_randint(low: int, high: int, shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """`torch.randint(low, high, shape)` for a batch whose first dimension is rows (see `batch_rand`)."""
    full, rows = _global_shape(shape)
    out = torch.randint(low, high, full, generator=generator, device=device)
    return out if rows is None else out[rows]
