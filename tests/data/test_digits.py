import os

import numpy as np
import pytest

from paddle_ernie5.data import digits as D


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("digits"))


def test_images_are_deterministic_and_split_by_source(cache, tmp_path):
    train = D.digit_images("train", size=16, cache_dir=cache)
    held = D.digit_images("heldout", size=16, cache_dir=cache)
    again = D.digit_images("train", size=16, cache_dir=str(tmp_path))  # built afresh elsewhere
    np.testing.assert_array_equal(train.pixels, again.pixels)
    for k in train.labels:
        np.testing.assert_array_equal(train.labels[k], again.labels[k])
    assert not set(train.source) & set(held.source)
    assert len(set(train.source)) + len(set(held.source)) == D.NUM_SOURCES
    assert 0.10 < len(set(held.source)) / D.NUM_SOURCES < 0.20
    assert train.pixels.shape[1:] == (3, 16, 16) and train.pixels.dtype == np.float32
    assert 0.0 <= train.pixels.min() and train.pixels.max() <= 1.0
    assert len(train) == 2 * len(set(train.source))  # two colourings per handwritten sample


def test_pixels_are_the_labelled_colours(cache):
    s = D.digit_images("heldout", size=16, cache_dir=cache)
    for i in range(20):
        fg, bg = s.labels["fg"][i], s.labels["bg"][i]
        assert (int(fg), int(bg)) in D.COLOUR_PAIRS
        px = s.pixels[i].reshape(3, -1).T
        ink = np.linalg.norm(px - D.PALETTE[fg], axis=1)
        paper = np.linalg.norm(px - D.PALETTE[bg], axis=1)
        assert (paper < 0.01).mean() > 0.15  # a good part of the image is background
        # some pixels are mostly ink
        assert ink.min() < 0.5 * np.linalg.norm(D.PALETTE[fg] - D.PALETTE[bg])
        # every pixel lies on the segment between the two colours
        span = D.PALETTE[fg] - D.PALETTE[bg]
        t = ((px - D.PALETTE[bg]) @ span) / np.sum(span**2)
        mix = D.PALETTE[bg] + np.clip(t, 0, 1)[:, None] * span
        assert np.abs(mix - px).max() < 0.01


def test_videos_move_as_labelled(cache):
    v = D.digit_videos("heldout", size=16, frames=8, cache_dir=cache)
    assert v.pixels.shape[1:] == (8, 3, 16, 16)
    steps = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
    for i in range(30):
        dy, dx = steps[D.DIRECTIONS[v.labels["direction"][i]]]
        sp = int(v.labels["speed"][i])
        for t in range(7):
            moved = np.roll(v.pixels[i, t], (dy * sp, dx * sp), axis=(1, 2))
            np.testing.assert_allclose(moved, v.pixels[i, t + 1], atol=1e-6)
    assert set(np.unique(v.labels["speed"])) == set(D.SPEEDS)
    assert set(np.unique(v.labels["direction"])) == set(range(len(D.DIRECTIONS)))


def test_captions_and_questions():
    red, blue = D.COLOURS.index("red"), D.COLOURS.index("blue")
    assert D.image_caption(3, red, blue) == "a red 3 on a blue background"
    assert (
        D.image_caption(8, D.COLOURS.index("orange"), D.COLOURS.index("white"))
        == "an orange 8 on a white background"
    )
    cap = D.video_caption(5, 0, 2, D.DIRECTIONS.index("left"), 2)
    assert cap == "a red 5 moving left quickly on a blue background"
    qa = dict(D.video_questions(5, 0, 2, D.DIRECTIONS.index("up"), 1))
    assert qa["What digit is this?"] == "5" and qa["Which way does the digit move?"] == "up"
    assert (
        qa["What colour is the background?"] == "blue"
        and qa["How fast does the digit move?"] == "slowly"
    )
    assert [D.pace_word(s) for s in D.SPEEDS] == list(D.PACES)
    with pytest.raises(ValueError, match="clip speed 3 has no word"):
        D.pace_word(3)


def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path, capsys):
    first = D.digit_images("heldout", size=8, copies=1, cache_dir=str(tmp_path))
    (path,) = [p for p in os.listdir(tmp_path) if p.endswith(".npz")]
    with open(tmp_path / path, "wb") as f:
        f.write(b"not a zip file")
    again = D.digit_images("heldout", size=8, copies=1, cache_dir=str(tmp_path))
    assert "not an npz archive" in capsys.readouterr().err
    np.testing.assert_array_equal(first.pixels, again.pixels)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
