import numpy as np

from paddle_ernie5.eval.routing import analyse, iou, normalised_entropy, top_set, write_report


def test_top_set_iou_and_entropy_by_hand():
    counts = np.array([10, 0, 5, 5, 7, 1, 0, 2])
    assert top_set(counts) == {0, 4}  # ceil(0.25 * 8) = 2 most used
    assert top_set(np.array([3, 3, 3, 3])) == {0}
    assert iou({0, 4}, {4, 5}) == 1 / 3
    assert normalised_entropy(np.array([5, 5, 5, 5])) == 1.0
    assert normalised_entropy(np.array([9, 0, 0, 0])) == 0.0
    p = np.array([0.5, 0.25, 0.25])
    assert np.isclose(normalised_entropy(np.array([2, 1, 1])), -(p * np.log(p)).sum() / np.log(3))


def test_analysis_and_report(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 50, size=(3, 16))
    usages = {"a": a, "a_again": a.copy(), "b": a[:, ::-1].copy()}
    res = analyse(usages)
    for mat in res["iou"].values():
        np.testing.assert_allclose(np.diag(mat), 1.0)
        np.testing.assert_allclose(mat, mat.T)
        assert mat[0, 1] == 1.0
    text = write_report(usages, [1, 2, 3], str(tmp_path))
    assert "| a vs a_again | 1.00 | 1.00 | 1.00 |" in text
    for name in ("usage_heatmaps.png", "iou_top25.png", "entropy.png", "report.md"):
        assert (tmp_path / name).stat().st_size > 0
