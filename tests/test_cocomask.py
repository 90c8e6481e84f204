"""cocomask.py as a specification: COCO RLE (column-major runs, compressed strings) and polygon
rasterization, checked against hand-computed masks and areas and against strings pycocotools wrote."""
from __future__ import annotations

import numpy as np
import pytest

from localization_heads import cocomask


def rectangle(height, width, x0, y0, x1, y1):
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


# --- RLE ---

def test_runs_go_down_the_columns_starting_with_background():
    mask = np.array([[0, 1],
                     [1, 1],
                     [0, 0]], dtype=bool)
    # column 0 reads 0 1 0, column 1 reads 1 1 0 → runs 1 off, 1 on, 1 off, 2 on, 1 off
    assert cocomask.mask_to_counts(mask) == [1, 1, 1, 2, 1]
    assert cocomask.encode(mask) == {"size": [3, 2], "counts": "11110"}   # what pycocotools.mask.encode gives


def test_a_mask_starting_with_foreground_opens_with_an_empty_run():
    assert cocomask.mask_to_counts(np.ones((2, 2), dtype=bool)) == [0, 4]
    assert cocomask.mask_to_counts(np.zeros((2, 2), dtype=bool)) == [4]


def test_compressed_and_uncompressed_rle_decode_to_the_same_mask():
    mask = rectangle(20, 20, 0, 0, 10, 5)
    # pycocotools 2.0.11: frPyObjects([[0,0, 10,0, 10,5, 0,5]], 20, 20) → this string
    assert np.array_equal(cocomask.decode({"size": [20, 20], "counts": "05?00000000000000000X6"}), mask)
    assert np.array_equal(cocomask.decode({"size": [20, 20], "counts": cocomask.mask_to_counts(mask)}), mask)
    assert np.array_equal(cocomask.decode({"size": [20, 20], "counts": b"05?00000000000000000X6"}), mask)


def test_encode_decode_round_trip_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = rng.integers(1, 40, size=2)
        # long and short runs, so the string's count differences are both positive and negative
        mask = rng.random((h, w)) < rng.uniform(0.05, 0.95)
        rle = cocomask.encode(mask)
        assert isinstance(rle["counts"], str)
        assert np.array_equal(cocomask.decode(rle), mask)


def test_bad_rle_is_a_value_error():
    with pytest.raises(ValueError, match="sum to"):
        cocomask.decode({"size": [4, 4], "counts": [3, 2]})
    with pytest.raises(ValueError, match="character"):
        cocomask.decode({"size": [4, 4], "counts": "0~"})


# --- polygons (pixel-edge coordinates: pixel (u, v) covers [u, u+1) × [v, v+1)) ---

def test_rectangle_polygon_covers_exactly_its_pixels():
    mask = cocomask.polygon_to_mask([0, 0, 10, 0, 10, 5, 0, 5], 20, 20)
    assert mask.sum() == 50 and np.array_equal(mask, rectangle(20, 20, 0, 0, 10, 5))
    shifted = cocomask.polygon_to_mask([3, 7, 9, 7, 9, 11, 3, 11], 20, 20)
    assert shifted.sum() == 24 and np.array_equal(shifted, rectangle(20, 20, 3, 7, 9, 11))


def test_polygon_outside_the_image_is_clipped():
    mask = cocomask.polygon_to_mask([-5, -5, 5, -5, 5, 5, -5, 5], 8, 8)
    assert mask.sum() == 25 and np.array_equal(mask, rectangle(8, 8, 0, 0, 5, 5))


def test_several_polygons_are_their_union():
    mask = cocomask.to_mask([[0, 0, 4, 0, 4, 4, 0, 4], [6, 6, 10, 6, 10, 10, 6, 10]], 12, 12)
    assert mask.sum() == 32 and np.array_equal(mask, rectangle(12, 12, 0, 0, 4, 4) | rectangle(12, 12, 6, 6, 10, 10))
    # one flat polygon, as the lmms-lab parquet copies store it
    assert np.array_equal(cocomask.to_mask([0, 0, 4, 0, 4, 4, 0, 4], 12, 12), rectangle(12, 12, 0, 0, 4, 4))


@pytest.mark.parametrize("polygon, height, width, area, counts", [
    # reference strings written by pycocotools 2.0.11 (merge(frPyObjects([polygon], h, w)))
    ([0, 0, 10, 0, 0, 10], 12, 12, 45, "093O1O1O1O1O1O1O1OU1"),
    ([2.5, 1, 9.3, 4.2, 6, 11.7, 0.4, 8], 14, 12, 55, "b05630100O01O0M4MX1"),
])
def test_slanted_polygons_match_pycocotools(polygon, height, width, area, counts):
    mask = cocomask.polygon_to_mask(polygon, height, width)
    assert mask.sum() == area
    assert cocomask.encode(mask)["counts"] == counts


def test_rle_size_must_match_the_image():
    with pytest.raises(ValueError, match="differs"):
        cocomask.to_mask({"size": [3, 2], "counts": "11110"}, 2, 3)


@pytest.mark.parametrize("bad", [[1, 2, 3, 4], [[0, 0, 1, float("nan"), 2, 2]], "0,0,1,1", []])
def test_malformed_segmentation_is_a_value_error(bad):
    with pytest.raises(ValueError):
        cocomask.to_mask(bad, 5, 5)
