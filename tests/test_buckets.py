"""Bucket shapes, bucket choice and crop geometry (lora_trainer.data.buckets)."""
import math
import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lora_trainer.data.buckets import bucket_finder, bucket_plan, make_buckets, nearest_bucket, resize_and_crop, square_plan, upscale_factor

# kohya sd-scripts' list for resolution 512, min 256, max 1024 (make_bucket_resolutions), worked out by hand.
KOHYA_512 = sorted({
    (256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384), (704, 320),
    (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
    (1024, 256), (768, 320), (640, 384), (576, 448),
    (320, 704), (320, 768), (256, 832), (256, 896), (256, 960), (256, 1024),
})


def test_matches_kohya_list_for_512():
    assert make_buckets(512, 256, 1024) == KOHYA_512


def test_sdxl_buckets_contain_the_familiar_shapes():
    b = make_buckets(1024, 256, 2048)
    for shape in [(1024, 1024), (832, 1216), (1216, 832), (896, 1152), (512, 2048), (2048, 512)]:
        assert shape in b


@settings(max_examples=60, deadline=None)
@given(res=st.integers(4, 32).map(lambda k: k * 64), lo=st.sampled_from([64, 128, 256, 320]),
       hi=st.sampled_from([1024, 1536, 2048, 4096]))
def test_bucket_properties(res, lo, hi):
    assume(lo <= res <= hi)  # the config rejects a resolution outside the bucket range
    buckets = make_buckets(res, lo, hi)
    assert buckets == sorted(set(buckets))
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert lo <= w <= hi and lo <= h <= hi
        assert w * h <= res * res
        assert (h, w) in buckets  # portrait and landscape alike
        # as large as the budget allows: one more step on one side would break the area or the max side
        assert (h + 64 > hi or w * (h + 64) > res * res) or (w + 64 > hi or (w + 64) * h > res * res)
    if res <= hi and res >= lo:
        assert (res, res) in buckets


def test_invalid_arguments():
    with pytest.raises(ValueError):
        make_buckets(512, 1100, 1024)  # min above max
    with pytest.raises(ValueError):
        make_buckets(32)
    with pytest.raises(ValueError):
        nearest_bucket(0, 10, [(64, 64)])


def test_nearest_bucket_matches_aspect():
    b = make_buckets(1024, 256, 2048)
    assert nearest_bucket(1664, 2432, b) == (832, 1216)  # exactly 2x of a bucket
    assert nearest_bucket(4000, 4000, b) == (1024, 1024)
    assert nearest_bucket(1920, 1080, b) == (1344, 768)  # 1.75 vs 16:9 = 1.78
    assert nearest_bucket(1080, 1920, b) == (768, 1344)
    assert nearest_bucket(100, 4000, b) == (256, 2048)  # beyond the tallest: the most extreme shape


@settings(max_examples=200, deadline=None)
@given(w=st.integers(16, 5000), h=st.integers(16, 5000))
def test_nearest_bucket_is_optimal_and_symmetric(w, h):
    b = make_buckets(1024, 256, 2048)
    bw, bh = nearest_bucket(w, h, b)
    err = abs(math.log(bw / bh) - math.log(w / h))
    assert all(err <= abs(math.log(x / y) - math.log(w / h)) + 1e-9 for x, y in b)
    assert nearest_bucket(h, w, b) == (bh, bw)


def test_bucket_finder_is_nearest_bucket_memoised():
    """The loops over a dataset's images (preflight, TrainImages) look buckets up through one finder per list."""
    rng = random.Random(3)
    lists = [make_buckets(1024, 256, 2048), make_buckets(512, 256, 1024)]
    finders = [bucket_finder(b) for b in lists]
    for _ in range(500):
        w, h = rng.choice([(512, 768), (1920, 1080)]) if rng.random() < 0.5 else (rng.randint(16, 5000),
                                                                                   rng.randint(16, 5000))
        for b, find in zip(lists, finders):
            assert find(w, h) == nearest_bucket(w, h, b)
    with pytest.raises(ValueError):
        finders[0](0, 10)


@settings(max_examples=300, deadline=None)
@given(w=st.integers(8, 6000), h=st.integers(8, 6000), seed=st.integers(0, 2**32), rand=st.booleans())
def test_crop_within_bounds(w, h, seed, rand):
    b = make_buckets(1024, 256, 2048)
    bucket = nearest_bucket(w, h, b)
    rw, rh, left, top = resize_and_crop(w, h, bucket, random_crop=rand, rng=random.Random(seed))
    bw, bh = bucket
    assert rw >= bw and rh >= bh
    assert 0 <= left <= rw - bw and 0 <= top <= rh - bh
    assert min(rw - bw, rh - bh) == 0  # scaled just enough to cover: one side fits exactly
    scale = max(bw / w, bh / h)
    assert abs(rw - w * scale) <= 1 and abs(rh - h * scale) <= 1  # aspect kept up to rounding
    if not rand:
        assert (left, top) == ((rw - bw) // 2, (rh - bh) // 2)


def test_random_crop_deterministic_with_seeded_rng():
    a = [resize_and_crop(3000, 1000, (1024, 1024), random_crop=True, rng=random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    lefts = {resize_and_crop(3000, 1000, (1024, 1024), random_crop=True, rng=random.Random(s))[2] for s in range(50)}
    assert len(lefts) > 10  # actually random across seeds
    rng = random.Random(3)
    seq1 = [resize_and_crop(3000, 1000, (1024, 1024), random_crop=True, rng=rng)[2] for _ in range(5)]
    rng = random.Random(3)
    seq2 = [resize_and_crop(3000, 1000, (1024, 1024), random_crop=True, rng=rng)[2] for _ in range(5)]
    assert seq1 == seq2 and len(set(seq1)) > 1


def test_square_plan_resizes_short_side_and_center_crops():
    (bucket,) = square_plan(512)
    assert bucket == (512, 512)
    assert resize_and_crop(1000, 600, bucket) == (853, 512, 170, 0)
    assert resize_and_crop(600, 1000, bucket) == (512, 853, 0, 170)
    assert resize_and_crop(256, 256, bucket) == (512, 512, 0, 0)  # upscaled
    assert upscale_factor(256, 256, bucket) == 2.0 and upscale_factor(1024, 2048, bucket) == 0.5


class Rec:
    def __init__(self, w, h, repeats=1):
        self.width, self.height, self.repeats = w, h, repeats


def test_bucket_plan_counts_and_partial_batches():
    b = make_buckets(512, 256, 1024)
    recs = [Rec(512, 512)] * 5 + [Rec(1000, 600, repeats=3)] * 2 + [(300, 900)]
    plan = bucket_plan(recs, b, batch_size=4)
    rows = {(r["width"], r["height"]): r for r in plan["buckets"]}
    assert rows[(512, 512)] == {"width": 512, "height": 512, "images": 5, "samples": 5, "batches": 2}
    wide = rows[nearest_bucket(1000, 600, b)]
    assert wide["images"] == 2 and wide["samples"] == 6 and wide["batches"] == 2
    tall = rows[nearest_bucket(300, 900, b)]
    assert tall["images"] == 1 and tall["batches"] == 1
    assert plan["total_images"] == 8 and plan["total_samples"] == 12
    assert plan["total_batches"] == 5 and plan["used_buckets"] == 3 and plan["num_buckets"] == len(b)
    with pytest.raises(ValueError):
        bucket_plan(recs, b, batch_size=0)
