import numpy as np
import ray

from instune.data.dedup.minhash import (
    EMPTY,
    band_keys,
    bucket_members,
    estimated_jaccard,
    greedy_duplicates,
    minhash_signatures,
    near_dedup,
    near_dedup_records,
    optimal_bands,
    shingle_tokens,
)
from instune.data.filters.decontaminate import ngram_hashes
from instune.data.schema import make_record

# A large vocabulary, so random texts share no shingles unless a test makes them.
VOCABULARY = [f"w{i}" for i in range(20_000)]


def random_text(seed: int, words_count: int = 80) -> str:
    """The same text for the same seed, whichever tests ran before."""
    return " ".join(np.random.default_rng(seed).choice(VOCABULARY, words_count))


def edited(text: str, changes: int) -> str:
    """`text` with `changes` words replaced, spread out so each breaks different shingles."""
    tokens = text.split()
    for k in range(changes):
        tokens[(k * 37 + 11) % len(tokens)] = f"edit{k}"
    return " ".join(tokens)


def true_jaccard(a: str, b: str, ngram: int = 5) -> float:
    sa = set(ngram_hashes(shingle_tokens(a), ngram).tolist())
    sb = set(ngram_hashes(shingle_tokens(b), ngram).tolist())
    return len(sa & sb) / len(sa | sb)


def conversation(position: int, answer: str, user: str = "Tell me something.") -> dict:
    return make_record(f"src:train.jsonl:line {position}", "src", "d", [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer},
    ])


def test_shingle_tokens_keep_operators_and_punctuation():
    assert shingle_tokens("What is 18 - 0?") == ["what", "is", "18", "-", "0", "?"]
    assert shingle_tokens('{"a": 1}') == ["{", '"', "a", '"', ":", "1", "}"]


def test_signatures_shape_type_and_determinism():
    texts = [random_text(1), random_text(2), ""]
    signatures = minhash_signatures(texts, num_perm=64, ngram=5, seed=1)
    assert signatures.shape == (3, 64) and signatures.dtype == np.uint32
    assert np.array_equal(signatures, minhash_signatures(texts, num_perm=64, ngram=5, seed=1))
    assert not np.array_equal(signatures[:2], minhash_signatures(texts, num_perm=64, ngram=5, seed=2)[:2])
    assert (signatures[2] == EMPTY).all()
    # A text's signature does not depend on the batch it is computed in.
    assert np.array_equal(minhash_signatures(texts[1:2], num_perm=64, seed=1)[0], signatures[1])


def test_estimated_jaccard_tracks_the_true_jaccard():
    base = random_text(3, 200)
    errors = []
    for changes in (0, 2, 5, 10, 20, 40):
        other = edited(base, changes)
        signatures = minhash_signatures([base, other], num_perm=256)
        errors.append(estimated_jaccard(signatures[0], signatures[1]) - true_jaccard(base, other))
    # Standard error at 256 permutations is at most 0.031.
    assert max(abs(e) for e in errors) < 0.1
    assert estimated_jaccard(*minhash_signatures([base, random_text(4, 200)])) < 0.05


def test_optimal_bands_matches_datasketch_and_puts_the_s_curve_at_the_threshold():
    assert optimal_bands(0.8, 128) == (9, 13)  # datasketch MinHashLSH(threshold=0.8, num_perm=128)
    for threshold in (0.5, 0.7, 0.8, 0.9):
        bands, rows = optimal_bands(threshold, 128)
        assert bands * rows <= 128
        assert abs((1 / bands) ** (1 / rows) - threshold) < 0.1


def test_band_keys_equal_only_for_equal_bands():
    signatures = minhash_signatures([random_text(5), random_text(6)], num_perm=128)
    same = np.stack([signatures[0], signatures[0], signatures[1]])
    same[2, :13] = signatures[0, :13]  # third row shares band 0 with the first
    keys = band_keys(same, 9, 13)
    assert keys.shape == (3, 9) and keys.dtype == np.int64
    assert (keys[0] == keys[1]).all()
    assert keys[2, 0] == keys[0, 0] and (keys[2, 1:] != keys[0, 1:]).all()
    # Equal values in different bands still give different keys.
    zeros = band_keys(np.zeros((1, 128), np.uint32), 9, 13)
    assert len(set(zeros[0].tolist())) == 9


def test_bucket_members_lists_shared_buckets_only():
    keys = np.array([[5, 1], [7, 2], [5, 3], [5, 2], [9, 4]])
    pairs = sorted(map(tuple, bucket_members(keys).tolist()))
    # Shared keys 2 and 5 are buckets 0 and 1 (their rank); keys seen once make no bucket.
    assert pairs == [(0, 1), (0, 3), (1, 0), (1, 2), (1, 3)]
    assert len(bucket_members(np.arange(10).reshape(5, 2))) == 0


def test_greedy_duplicates_compare_with_kept_rows_only():
    base = random_text(7, 120)
    texts = [base, edited(base, 1), random_text(8, 120), edited(base, 2), random_text(9, 120)]
    signatures = minhash_signatures(texts)
    # Bucket 0 holds the edits and an unrelated text (a false candidate); bucket 1 is unrelated texts only.
    pairs = np.array([[0, 0], [0, 1], [0, 2], [0, 3], [1, 2], [1, 4]])
    duplicates = greedy_duplicates(signatures, pairs, threshold=0.7)
    assert sorted(duplicates) == [1, 3]
    # Row 3 is close to row 1 too, but row 1 is a duplicate: it names the kept row 0.
    assert all(kept == 0 and similarity >= 0.7 for kept, similarity in duplicates.values())
    assert greedy_duplicates(signatures, np.zeros((0, 2), np.int64), 0.7) == {}


def chain_texts() -> list[str]:
    """A, B, C: B is A with 5 words replaced, C is B with 5 other words replaced (true Jaccard 0.87, 0.84, and
    0.73 for A and C)."""
    a = random_text(21, 300).split()
    b, c = list(a), list(a)
    for k in range(5):
        b[k * 60] = c[k * 60] = f"b{k}"
        c[k * 60 + 30] = f"c{k}"
    return [" ".join(a), " ".join(b), " ".join(c)]


def test_a_chain_of_near_copies_keeps_its_far_end():
    a, b, c = chain_texts()
    signatures = minhash_signatures([a, b, c])
    # The estimates the clustering sees: A~B and B~C at 0.8 or more, A and C below.
    assert estimated_jaccard(signatures[0], signatures[1]) >= 0.8
    assert estimated_jaccard(signatures[1], signatures[2]) >= 0.8
    assert estimated_jaccard(signatures[0], signatures[2]) < 0.8
    # All three in one bucket: C is compared with the kept A only, not with the removed B.
    assert greedy_duplicates(signatures, np.array([[0, 0], [0, 1], [0, 2]]), 0.8).keys() == {1}
    records = [conversation(1, a), conversation(2, b), conversation(3, c)]
    kept, rejects = near_dedup_records(records, threshold=0.8)
    # Connected components of verified pairs would drop C as well (through B).
    assert [r["id"] for r in kept] == ["src:train.jsonl:line 1", "src:train.jsonl:line 3"]
    assert [r["record"] for r in rejects] == ["line 2"]
    assert rejects[0]["reason"].startswith("near-duplicate of src:train.jsonl:line 1 (jaccard≈")


def test_near_dedup_records_drops_edits_and_keeps_templated_tasks():
    long_answer = random_text(10, 300)  # one edit leaves Jaccard ~0.97
    records = [
        conversation(3, long_answer),
        conversation(1, edited(long_answer, 1)),  # the smaller id is the one kept
        conversation(2, random_text(11, 100)),
        conversation(4, "5 km is 3.107 miles.", user="Convert 5 km to miles."),
        conversation(5, "7 km is 4.350 miles.", user="Convert 7 km to miles."),
        conversation(6, "12", user="What is 7 + 5?"),
        conversation(7, "13", user="What is 8 + 5?"),
        # Only the operator differs (a pair the embedded corpus really generates).
        conversation(8, "18", user="What is 18 + 0?"),
        conversation(9, "18", user="What is 18 - 0?"),
    ]
    kept, rejects = near_dedup_records(records, threshold=0.8)
    assert [r["id"] for r in kept] == [f"src:train.jsonl:line {i}" for i in (1, 2, 4, 5, 6, 7, 8, 9)]
    assert len(rejects) == 1
    reject = rejects[0]
    assert (reject["record"], reject["stage"]) == ("line 3", "dedup:near")
    assert reject["reason"].startswith("near-duplicate of src:train.jsonl:line 1 (jaccard≈0.")


def test_ray_near_dedup_is_global_and_matches_the_plain_version(local_ray):
    originals = [conversation(i, random_text(100 + i, 150)) for i in range(64)]
    # Near copies (one word in 150 changed, Jaccard ~0.93) of the first 16, placed at the end so they fall in
    # other blocks; and 3 copies of copies.
    copies = [conversation(1000 + i, edited(originals[i]["messages"][1]["content"], 1)) for i in range(16)]
    chained = [conversation(2000 + i, edited(copies[i]["messages"][1]["content"], 2)) for i in range(3)]
    records = originals + copies + chained
    ds = ray.data.from_items(records, override_num_blocks=8)
    kept, rejects = near_dedup(ds, threshold=0.7, num_perm=128, ngram=5, seed=0)
    assert sorted(r["id"] for r in kept.take_all()) == sorted(r["id"] for r in originals)
    # Every reason's similarity is to a kept record, at or above the threshold.
    similarities = [float(r["reason"].rpartition("≈")[2].rstrip(")")) for r in rejects.take_all()]
    assert len(similarities) == 19 and min(similarities) >= 0.7
    rows = sorted(rejects.take_all(), key=lambda r: r["record"])
    assert len(rows) == 19
    assert {r["stage"] for r in rows} == {"dedup:near"}
    by_record = {r["record"]: r["reason"] for r in rows}
    assert by_record["line 1005"].startswith("near-duplicate of src:train.jsonl:line 5 (jaccard≈")
    assert by_record["line 2001"].startswith("near-duplicate of src:train.jsonl:line 1 (jaccard≈")
    _, expected = near_dedup_records(records, threshold=0.7, num_perm=128, ngram=5, seed=0)
    assert rows == sorted(expected, key=lambda r: r["record"])
    assert kept.schema().names == ["id", "source", "domain", "messages", "metadata"]


def test_ray_near_dedup_does_not_depend_on_blocks(local_ray, tmp_path):
    """Chains, edits and unrelated texts in 1 block (materialized) and in 7 (signatures written to a work
    directory and read back by the driver, as prepare runs it): the same kept ids and the same reasons."""
    texts = chain_texts() + [random_text(300 + i, 200) for i in range(20)]
    texts += [edited(texts[3 + i], 1 + i % 2) for i in range(10)] + [edited(texts[1], 1)]
    records = [conversation(i, text) for i, text in enumerate(texts)]
    results = []
    for blocks, work_dir in ((1, None), (7, str(tmp_path / "near"))):
        kept, rejects = near_dedup(ray.data.from_items(records, override_num_blocks=blocks), threshold=0.8,
                                   work_dir=work_dir)
        results.append((sorted(r["id"] for r in kept.take_all()),
                        sorted((r["record"], r["reason"]) for r in rejects.take_all())))
    assert results[0] == results[1]
    kept_ids, reasons = results[0]
    # B (line 1) and the 10 edits go; C (line 2) and the edit of B (line 33) stay: their near copy B is not
    # kept, and they are below the threshold with A.
    assert {"src:train.jsonl:line 2", "src:train.jsonl:line 33"} <= set(kept_ids) and len(reasons) == 11
    _, plain = near_dedup_records(records, threshold=0.8)
    assert reasons == sorted((r["record"], r["reason"]) for r in plain)
    assert all(float(reason.rpartition("≈")[2].rstrip(")")) >= 0.8 for _, reason in reasons)
