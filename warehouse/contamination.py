"""Contamination of evaluation sets by a pretraining snapshot, measured by word n-gram overlap.

The method of the GPT-3 and Llama papers: an evaluation example is contaminated when a large share
of its word n-grams also occurs somewhere in the pretraining data.

Words are `re.findall(r"\\w+", text.lower())`; an n-gram is `n` consecutive words of one text. An
example's overlap is the share of its n-gram positions whose n-gram occurs in the corpus (an n-gram
repeated inside the example counts each time). The n-grams of the evaluation examples (small) are
hashed into sets; the pretraining texts (big) are streamed once, in batches, and only looked up in
those sets: the corpus's own n-gram set is never built.

Hashing. Each distinct evaluation word is hashed once with blake2b to a 64-bit int (stable across
processes, unlike `hash` on strings). An n-gram is hashed once, to a 64-bit int, as the tuple of its
word hashes (CPython's tuple hash, an xxHash-style mix; on ints it is not salted). Corpus words that
no evaluation text contains map to None: an n-gram holding one cannot be an evaluation n-gram, and
its hash is never in the set. The per-word work (regex, dict look-up, zip, hash, set intersection)
runs in C, about 2**18 words at a time. Examples shorter than n words (below) give k-grams of other
lengths, kept in their own sets and looked for only at corpus positions that start with the first
word of such an example. A false match needs a 64-bit collision: about |eval n-grams| x |corpus
n-grams| / 2**64, negligible at these sizes.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from itertools import compress
from pathlib import Path
from typing import Iterable, Iterator

from warehouse import store

_WORD = re.compile(r"\w+")
_NON_WORD = re.compile(r"\W")
TOP_EXAMPLES = 20
# Memory bounds of the corpus pass: words are looked up in chunks of about this many, and a longer
# text is read in pieces of about this many characters (cut between words).
_CHUNK_WORDS = 1 << 18
_PIECE_CHARS = 1 << 20


@dataclass
class Contamination:
    split: str
    n: int
    n_examples: int  # examples scored: those with at least one word (texts without words are skipped)
    mean_overlap: float  # mean over examples of (their n-grams seen in the snapshot / their n-grams)
    contaminated: int  # examples whose overlap >= example_threshold
    contaminated_frac: float  # contaminated / n_examples (0.0 for a split with no scored example)
    examples: list[tuple[int, float]]  # (index within the split, overlap) of the 20 most overlapping (overlap > 0)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def _kgrams(ids: list, k: int) -> Iterator[int]:
    """The 64-bit hash of every k consecutive items of `ids` (word hashes, or None for unknown words)."""
    return map(hash, zip(*[ids[i:] for i in range(k)]))


def _corpus_chunks(corpus_batches: Iterable[list[str]], word_hash: dict[str, int], carry: int) -> Iterator[list]:
    """The corpus as lists of word hashes (None for a word no evaluation text has, and between two
    texts, so that no n-gram spans two texts). Each list is about _CHUNK_WORDS long and starts with
    the last `carry` items of the one before, so every k-gram (k <= carry + 1) lies whole in one list."""
    get = word_hash.get
    ids: list = []
    fresh = False  # whether `ids` holds words not yet yielded
    for batch in corpus_batches:
        for text in batch:
            text = text.lower()
            pos = 0
            while pos < len(text):
                end = pos + _PIECE_CHARS
                if end < len(text):  # a long text: cut it at the next non-word character
                    cut = _NON_WORD.search(text, end)
                    end = cut.start() if cut else len(text)
                ids.extend(map(get, _WORD.findall(text, pos, end)))
                fresh = True
                pos = end
                if len(ids) >= _CHUNK_WORDS:
                    yield ids
                    ids, fresh = (ids[len(ids) - carry:] if carry else []), False
            ids.append(None)
    if fresh:
        yield ids


def ngram_overlap(eval_texts: dict[str, list[str]], corpus_batches: Iterable[list[str]], n: int = 8,
                  example_threshold: float = 0.5) -> dict[str, Contamination]:
    """Per evaluation split, how much of its n-grams occur in the corpus (consumed once, streamed)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    word_hash: dict[str, int] = {}
    per_split: dict[str, list[tuple[int, int, list[int]]]] = {}  # split -> [(index, k, n-gram hashes)]
    wanted: dict[int, set[int]] = {}  # k -> hashes of the evaluation k-grams
    first_words: dict[int, set[int]] = {}  # k < n -> first word hashes of the short examples of k words
    for split, texts in eval_texts.items():
        scored = per_split[split] = []
        for i, text in enumerate(texts):
            ws = words(text)
            if not ws:
                continue  # no words, no n-gram: the example is skipped (not scored, not counted)
            for w in ws:
                if w not in word_hash:
                    word_hash[w] = _word_hash(w)
            # An example shorter than n words has one n-gram: all its words (k = its length).
            k = min(n, len(ws))
            ids = [word_hash[w] for w in ws]
            grams = list(_kgrams(ids, k))
            scored.append((i, k, grams))
            wanted.setdefault(k, set()).update(grams)
            if k < n:
                first_words.setdefault(k, set()).add(ids[0])

    seen: dict[int, set[int]] = {k: set() for k in wanted}
    for ids in _corpus_chunks(corpus_batches, word_hash, max(wanted, default=1) - 1):
        for k, want in wanted.items():
            if k == n:  # most corpus positions are candidates: hash them all, in C
                seen[k] |= want.intersection(_kgrams(ids, k))
            else:  # few short examples: hash only the positions that start with one's first word
                starts = compress(range(len(ids) - k + 1), map(first_words[k].__contains__, ids))
                seen[k] |= want.intersection(hash(tuple(ids[j:j + k])) for j in starts)

    results: dict[str, Contamination] = {}
    for split, scored in per_split.items():
        overlaps = [(i, sum(g in seen[k] for g in grams) / len(grams)) for i, k, grams in scored]
        n_ex = len(overlaps)
        bad = sum(o >= example_threshold for _, o in overlaps)
        top = sorted((x for x in overlaps if x[1] > 0), key=lambda x: (-x[1], x[0]))[:TOP_EXAMPLES]
        results[split] = Contamination(
            split=split, n=n, n_examples=n_ex,
            mean_overlap=sum(o for _, o in overlaps) / n_ex if n_ex else 0.0,
            contaminated=bad, contaminated_frac=bad / n_ex if n_ex else 0.0, examples=top)
    return results


def _snapshot_batches(db_path: str | Path, snapshot_id: str, batch: int) -> Iterator[list[str]]:
    for split in store.SPLITS:  # the whole snapshot was seen in pretraining, held-out splits included
        yield from store.iter_texts(db_path, snapshot_id, split, batch, ordered=False)  # overlap ignores order


def snapshot_contamination(db_path: str | Path, snapshot_id: str, eval_texts: dict[str, list[str]], n: int = 8,
                           example_threshold: float = 0.5, batch: int = 2048) -> dict[str, Contamination]:
    """`ngram_overlap` of `eval_texts` against every document of a warehouse snapshot, streamed."""
    with store.connect(db_path, read_only=True) as con:
        store.snapshot_info(con, snapshot_id)  # raises WarehouseError for an unknown snapshot
    del con
    return ngram_overlap(eval_texts, _snapshot_batches(db_path, snapshot_id, batch), n, example_threshold)
