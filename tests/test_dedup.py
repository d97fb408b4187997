"""Near-duplicate detection: near-copies are found, unrelated and half-similar texts are not, and
the kept copy does not depend on input order."""
import random

import pytest

from warehouse.dedup import NearDup, NearDupConfig, near_duplicates, shingles


def words(n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    return ["".join(r.choices("abcdefghijklmnopqrstuvwxyz", k=r.randint(3, 9))) for _ in range(n)]


def edit(ws: list[str], positions: list[int], seed: int) -> list[str]:
    """A copy with the words at `positions` replaced by fresh ones."""
    out = list(ws)
    for pos, new in zip(positions, words(len(positions), seed)):
        out[pos] = new + "x"
    return out


def jaccard(a: str, b: str, k: int = 5) -> float:
    sa, sb = shingles(a, k), shingles(b, k)
    return len(sa & sb) / len(sa | sb)


BASE = words(200, seed=1)
ORIGINAL = " ".join(BASE)


def test_a_paragraph_with_one_word_changed_is_found():
    copy = " ".join(edit(BASE, [100], seed=2))
    found = near_duplicates([("b-copy", copy), ("a-orig", ORIGINAL)], NearDupConfig())
    assert [(d.doc_id, d.duplicate_of) for d in found] == [("b-copy", "a-orig")]
    assert found[0].jaccard >= 0.8
    assert abs(found[0].jaccard - jaccard(copy, ORIGINAL)) < 0.1  # an estimate of the real thing


def test_case_and_whitespace_do_not_hide_a_copy():
    copy = ORIGINAL.upper().replace(" ", "\n  ")
    assert [d.doc_id for d in near_duplicates([("1", ORIGINAL), ("2", copy)], NearDupConfig())] == ["2"]


def test_unrelated_documents_are_not_flagged():
    docs = [(f"doc{i:02d}", " ".join(words(150, seed=100 + i))) for i in range(30)]
    assert near_duplicates(docs, NearDupConfig()) == []


def test_half_similar_pair_is_flagged_at_0_3_not_at_0_8():
    other = " ".join(BASE[:134] + words(66, seed=3))
    assert 0.45 < jaccard(ORIGINAL, other) < 0.55
    assert near_duplicates([("a", ORIGINAL), ("b", other)], NearDupConfig(threshold=0.8)) == []
    assert [d.doc_id for d in near_duplicates([("a", ORIGINAL), ("b", other)], NearDupConfig(threshold=0.3))] == ["b"]


def corpus() -> list[tuple[str, str]]:
    group = [" ".join(edit(BASE, [i * 37 % 200], seed=10 + i)) for i in range(4)]
    other_base = words(120, seed=4)
    pair = [" ".join(other_base), " ".join(edit(other_base, [60], seed=5))]
    loners = [" ".join(words(80, seed=50 + i)) for i in range(6)]
    ids = ["k3", "c7", "a1", "z0", "m2", "m1", "q5", "b1", "e4", "x2", "y3", "d9"]
    return list(zip(ids, group + pair + loners))


def test_keep_rule_is_the_smallest_doc_id_whatever_the_order():
    docs = corpus()
    expected = near_duplicates(docs, NearDupConfig())
    assert {(d.doc_id, d.duplicate_of) for d in expected} == {("k3", "a1"), ("c7", "a1"), ("z0", "a1"), ("m2", "m1")}
    for seed in range(5):
        shuffled = list(docs)
        random.Random(seed).shuffle(shuffled)
        assert near_duplicates(iter(shuffled), NearDupConfig()) == expected
    assert [d.doc_id for d in expected] == sorted(d.doc_id for d in expected)


def test_no_chaining_a_dropped_document_resembles_what_it_maps_to():
    # b is 3 words from a and c is 3 words from b, but c is 6 words from a.
    b = edit(BASE, [20, 90, 160], seed=6)
    c = edit(b, [50, 120, 190], seed=7)
    a_, b_, c_ = ORIGINAL, " ".join(b), " ".join(c)
    assert jaccard(a_, b_) > 0.85 and jaccard(b_, c_) > 0.85 and jaccard(a_, c_) < 0.75
    found = near_duplicates([("c", c_), ("b", b_), ("a", a_)], NearDupConfig())
    assert [(d.doc_id, d.duplicate_of) for d in found] == [("b", "a")]  # c stays: b was dropped, a is unlike it


def test_short_texts_are_shingled_not_dropped_and_do_not_all_collide():
    short = [("s1", "Return the current file position."), ("s2", "Make a directory called targetpath."),
             ("s3", "Close the file."), ("s4", "Close the file."), ("s5", "close   THE file."), ("s6", "")]
    found = near_duplicates(short, NearDupConfig())
    assert {(d.doc_id, d.duplicate_of) for d in found} == {("s4", "s3"), ("s5", "s3")}
    assert shingles("two words", 5) == {b"two words"}


def test_empty_input_disabled_and_repeated_ids():
    assert near_duplicates([], NearDupConfig()) == []
    assert near_duplicates([("a", ORIGINAL), ("b", ORIGINAL)], NearDupConfig(enabled=False)) == []
    with pytest.raises(ValueError, match="given twice"):
        near_duplicates([("a", ORIGINAL), ("a", "something else entirely here")], NearDupConfig())
    with pytest.raises(ValueError, match="threshold"):
        NearDupConfig(threshold=1.5)
    with pytest.raises(ValueError, match="too close to 1 for num_perm 128"):
        near_duplicates([("a", ORIGINAL)], NearDupConfig(threshold=0.99))


def test_result_rows_are_plain_records():
    found = near_duplicates([("a", ORIGINAL), ("b", ORIGINAL + " end")], NearDupConfig(num_perm=64, seed=7))
    assert found == [NearDup("b", "a", found[0].jaccard)] and 0.9 <= found[0].jaccard <= 1.0
