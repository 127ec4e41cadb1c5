"""`python -m paddle_ernie5.rl.compare`: bad run directories give one clear error and exit 2."""

from paddle_ernie5.rl import compare


def test_a_directory_without_a_summary_is_one_error(tmp_path, capsys):
    assert compare.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no rl_summary.json" in err and str(tmp_path) in err
    assert "Traceback" not in err


def test_a_corrupt_summary_is_one_error(tmp_path, capsys):
    (tmp_path / "rl_summary.json").write_text("{not json", encoding="utf-8")
    assert compare.main([str(tmp_path)]) == 2
    assert "not a readable RL summary" in capsys.readouterr().err
