"""Matched comparison of evaluated runs (eval/compare.py) on hand-made eval.json files."""

import json

import pytest

from paddle_ernie5.eval import compare


def _run(tmp_path, name, **metrics):
    d = tmp_path / name
    d.mkdir()
    (d / "eval.json").write_text(
        json.dumps([{k.replace("__", "/"): v for k, v in metrics.items()}])
    )
    return str(d)


def test_means_relative_change_and_direction_of_the_bound(tmp_path, capsys):
    base = [
        _run(tmp_path, "b0", text__ppl=40.0, vision__image_qa=0.50),
        _run(tmp_path, "b1", text__ppl=50.0, vision__image_qa=0.70),
    ]
    cand = [
        _run(tmp_path, "c0", text__ppl=44.0, vision__image_qa=0.40, audio__asr_word_acc=0.7),
        _run(tmp_path, "c1", text__ppl=54.0, vision__image_qa=0.70, audio__asr_word_acc=0.8),
    ]
    rows = {
        r["key"]: r
        for r in compare.compare(
            [compare.load_eval(d) for d in base], [compare.load_eval(d) for d in cand], bound=0.10
        )
    }
    assert rows["text/ppl"]["relative"] == pytest.approx(98 / 90 - 1)  # +8.9%: within 10%
    assert not rows["text/ppl"]["worse"]
    assert rows["vision/image_qa"]["relative"] == pytest.approx(0.55 / 0.60 - 1)  # -8.3%
    assert not rows["vision/image_qa"]["worse"]
    assert rows["audio/asr_word_acc"]["mean_candidate"] == pytest.approx(0.75)
    assert rows["audio/asr_word_acc"]["relative"] is None
    assert "vision/video_qa_direction" not in rows  # in no run
    # A tighter bound: perplexity (lower is better) rising 8.9% and image QA falling 8.3% both
    # fail it.
    tight = compare.compare(
        [compare.load_eval(d) for d in base], [compare.load_eval(d) for d in cand], 0.05
    )
    assert {r["key"] for r in tight if r["worse"]} == {"text/ppl", "vision/image_qa"}
    assert compare.main(["--baseline", *base, "--candidate", *cand]) == 0
    assert compare.main(["--baseline", *base, "--candidate", *cand, "--bound", "0.05"]) == 1
    out = capsys.readouterr().out
    assert (
        "| text perplexity (validation) | 44.000 / 40.000 | 54.000 / 50.000 | 49.000 / 45.000 "
        "| +8.9% ± 0.0% | no |" in out
    )
    # image QA: paired differences -0.1 and 0: standard error 0.05 of the mean, 0.05 / 0.6 relative
    assert rows["vision/image_qa"]["relative_se"] == pytest.approx(0.05 / 0.6)
    assert "| -8.3% ± 8.3% | no |" in out
    assert "c0 / b0" in out


def test_improvements_negative_and_zero_baselines():
    def rows(b, c):
        return {r["key"]: r for r in compare.compare(b, c, bound=0.10)}

    # Perplexity 40 -> 30 and accuracy 0.5 -> 0.8 are large improvements, not beyond-the-bound
    # losses.
    r = rows(
        [{"text/ppl": 40.0, "vision/image_qa": 0.5}], [{"text/ppl": 30.0, "vision/image_qa": 0.8}]
    )
    assert r["text/ppl"]["relative"] == pytest.approx(-0.25) and not r["text/ppl"]["worse"]
    assert (
        r["vision/image_qa"]["relative"] == pytest.approx(0.6) and not r["vision/image_qa"]["worse"]
    )
    # Caption information can be negative: -0.01 -> +0.02 is better, -0.01 -> -0.05 worse.
    key = "vision/t2i_caption_nats"
    up, down = rows([{key: -0.01}], [{key: 0.02}])[key], rows([{key: -0.01}], [{key: -0.05}])[key]
    assert up["relative"] == pytest.approx(3.0) and not up["worse"]
    assert down["relative"] == pytest.approx(-4.0) and down["worse"]
    # From a zero baseline there is no relative change; a drop still counts.
    zero_up, zero_down = (
        rows([{key: 0.0}], [{key: 0.3}])[key],
        rows([{key: 0.0}], [{key: -0.1}])[key],
    )
    assert zero_up["relative"] is None and not zero_up["worse"] and zero_down["worse"]
    assert "| n/a | yes |" in compare.markdown([zero_up], ["c / b"], 0.10)


def test_bad_input_is_one_clear_message(tmp_path, capsys):
    a = _run(tmp_path, "a", text__ppl=1.0)
    assert compare.main(["--baseline", a, "--candidate", a, a]) == 2
    assert "1 baseline runs but 2 candidate runs" in capsys.readouterr().err
    assert compare.main(["--baseline", a, "--candidate", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "eval.json not found" in err and "ernie5 eval --checkpoint" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    for text in ("[]", "{not json", '["x"]'):
        (bad / "eval.json").write_text(text)
        assert compare.main(["--baseline", a, "--candidate", str(bad)]) == 2
        assert "is not an evaluation table" in capsys.readouterr().err
    (tmp_path / "a" / "config.yaml").write_text("train:\n  seed: 0\n")
    b = _run(tmp_path, "b", text__ppl=1.0)
    (tmp_path / "b" / "config.yaml").write_text("train:\n  seed: 3\n")
    assert compare.main(["--baseline", a, "--candidate", b]) == 2
    assert "train.seed 3" in capsys.readouterr().err


def test_eval_compare_without_the_grid_points_to_the_matched_comparison(tmp_path, capsys):
    from paddle_ernie5.cli import main

    assert main(["eval", "--checkpoint", str(tmp_path), "--compare", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--elastic-grid" in err and "python -m paddle_ernie5.eval.compare" in err
