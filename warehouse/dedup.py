"""Near-duplicate documents, found with MinHash LSH over word shingles (datasketch).

Exact duplicates are already one row (doc_id is the content hash); this finds documents that
differ by a few words: boilerplate module headers, copied docstrings, re-posted pages. Each text
becomes the set of its lower-cased `shingle_words`-word shingles, sketched with MinHash; LSH
proposes candidate pairs and the MinHash estimate of their Jaccard similarity confirms them.

Which copy survives must not depend on the order documents are read, so that a snapshot holds the
same texts however the corpus was listed: documents are visited by ascending doc_id, and each is
kept unless it is a near-duplicate (estimate >= threshold) of one already kept, in which case it
maps to the smallest such doc_id. So within a group of near-copies the smallest doc_id is kept,
and every dropped document is itself within the threshold of the one it maps to (no chaining
A~B~C that drops C for an A it does not resemble).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from datasketch import LeanMinHash, MinHash, MinHashLSH


@dataclass
class NearDupConfig:
    enabled: bool = True
    threshold: float = 0.8  # estimated Jaccard similarity of the shingle sets at which two texts are near-copies
    num_perm: int = 128  # MinHash permutations: the estimate's standard error is about sqrt(J(1-J)/num_perm)
    shingle_words: int = 5
    seed: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"corpus.near_dup.threshold must be between 0 and 1, got {self.threshold!r}")
        if self.num_perm < 2 or self.shingle_words < 1:
            raise ValueError(f"corpus.near_dup needs num_perm >= 2 and shingle_words >= 1, "
                             f"got {self.num_perm} and {self.shingle_words}")


def _index(cfg: NearDupConfig) -> MinHashLSH:
    try:
        return MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    except ValueError:  # datasketch finds no banding with >= 2 bands (e.g. 0.99 at 128 permutations)
        raise ValueError(f"corpus.near_dup.threshold {cfg.threshold} is too close to 1 for num_perm "
                         f"{cfg.num_perm}; lower the threshold or raise num_perm") from None


@dataclass(frozen=True)
class NearDup:
    doc_id: str  # the document to drop
    duplicate_of: str  # the kept document it nearly copies (the smaller doc_id)
    jaccard: float  # MinHash estimate of the Jaccard similarity of their shingle sets


def shingles(text: str, k: int) -> set[bytes]:
    """Lower-cased k-word shingles. A text of fewer than k words is one shingle of all its words, so
    two short texts match only when their words are the same (an empty text is the empty shingle)."""
    words = text.lower().split()
    if len(words) <= k:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + k]).encode() for i in range(len(words) - k + 1)}


def sketches(docs: Iterable[tuple[str, str]], cfg: NearDupConfig) -> Iterator[tuple[str, LeanMinHash]]:
    """(doc_id, MinHash of its shingles), lazily; the permutations are drawn once for all documents."""
    blank = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
    for doc_id, text in docs:
        mh = blank.copy()  # shares the permutations: no per-document setup
        mh.update_batch(shingles(text, cfg.shingle_words))
        yield doc_id, LeanMinHash(mh)


def near_duplicates(docs: Iterable[tuple[str, str]], cfg: NearDupConfig) -> list[NearDup]:
    """The documents to drop as near-copies of a kept one, sorted by doc_id; [] when disabled.

    `docs` are (doc_id, text) with unique doc_ids, in any order; the result does not depend on it."""
    if not cfg.enabled:
        return []
    lsh = _index(cfg)
    sketch: dict[str, LeanMinHash] = {}
    with lsh.insertion_session() as session:
        for doc_id, mh in sketches(docs, cfg):
            if doc_id in sketch:
                raise ValueError(f"near_duplicates: doc_id {doc_id!r} given twice; doc_ids must be unique")
            sketch[doc_id] = mh
            session.insert(doc_id, mh)
    kept: set[str] = set()
    found: list[NearDup] = []
    for doc_id in sorted(sketch):
        mh = sketch[doc_id]
        # LSH candidates include false positives (and miss a few true pairs near the threshold); the
        # estimate decides. Only already-kept documents can absorb this one.
        near = sorted(other for other in lsh.query(mh) if other in kept and mh.jaccard(sketch[other]) >= cfg.threshold)
        if near:
            found.append(NearDup(doc_id, near[0], float(mh.jaccard(sketch[near[0]]))))
        else:
            kept.add(doc_id)
    return found
