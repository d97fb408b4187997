"""Token shards: each split of a snapshot as one flat token array plus document offsets (.npy)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from warehouse.store import SPLITS, iter_texts


def write_token_shards(db_path: str | Path, snapshot_id: str, tokenizer_path: str | Path, out_dir: str | Path) -> dict:
    """Writes `<split>.tokens.npy` and `<split>.offsets.npy` (n_docs + 1 boundaries); returns counts."""
    tok = Tokenizer.from_file(str(tokenizer_path))
    dtype = np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in SPLITS:
        pieces, lengths = [], []
        for batch in iter_texts(db_path, snapshot_id, split):
            for enc in tok.encode_batch_fast(batch, add_special_tokens=False):
                pieces.append(np.asarray(enc.ids, dtype=dtype))
                lengths.append(len(enc.ids))
        tokens = np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        np.save(out / f"{split}.tokens.npy", tokens)
        np.save(out / f"{split}.offsets.npy", offsets)
        counts[split] = {"documents": len(lengths), "tokens": int(len(tokens))}
    (out / "meta.json").write_text(json.dumps({"snapshot_id": snapshot_id, "splits": counts}, indent=2))
    return counts


def load_split(shard_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    d = Path(shard_dir)
    return np.load(d / f"{split}.tokens.npy", mmap_mode="r"), np.load(d / f"{split}.offsets.npy")
