"""The mixing arithmetic: copies per record for a mixture of given weights and size, and the draw of each split."""

from collections import Counter

import pyarrow as pa
import pytest

from instune.data.mix import draw_batch, mixture_copies, requested_fractions
from instune.errors import UserError


def test_mixture_copies_upsample_small_sources_and_follow_weights():
    kept, weights = {"big": 1000, "small": 10, "none": 0}, {"big": 1.0, "small": 1.0, "none": 5.0}
    copies = mixture_copies(kept, weights, 400)
    assert copies == {"big": 0.2, "small": 20.0, "none": 0.0}
    assert requested_fractions(kept, weights, 400) == {"big": 0.5, "small": 0.5, "none": 0.0}
    # Without a size every kept record is drawn once, so the sources' shares follow their sizes.
    assert requested_fractions(kept, weights, None) == {"big": 1000 / 1010, "small": 10 / 1010, "none": 0.0}
    with pytest.raises(UserError, match="weight 0"):
        mixture_copies({"a": 5}, {"a": 0.0}, 10)


def test_draw_batch_splits_and_repeats_by_id():
    ids = [f"s:f:line {i}" for i in range(2000)]
    batch = pa.table({"id": ids, "source": ["s"] * 2000})
    kwargs = {"copies_by_source": {"s": 1.5}, "seed": 3, "validation_fraction": 0.2}
    train, validation = draw_batch(batch, "train", **kwargs), draw_batch(batch, "validation", **kwargs)
    train_ids, validation_ids = set(train["id"].to_pylist()), set(validation["id"].to_pylist())
    assert not train_ids & validation_ids and len(train_ids | validation_ids) == 2000
    assert abs(len(validation_ids) - 400) < 60 and validation.num_rows == len(validation_ids)
    repeats = Counter(train["id"].to_pylist())
    assert set(repeats.values()) == {1, 2} and abs(train.num_rows / len(train_ids) - 1.5) < 0.06
    assert sorted(train["copy"].to_pylist()).count(1) == sum(n == 2 for n in repeats.values())
    assert draw_batch(batch, "train", **kwargs).equals(train)  # the same draw every time
