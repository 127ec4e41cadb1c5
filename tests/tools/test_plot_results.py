"""tools/plot_results.py: reads metrics.jsonl and a routing report, writes PNGs."""

import json
import math
import os

from support import load_tool


def _tool():
    return load_tool("plot_results")


def _run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w", encoding="utf-8") as f:
        for step in range(10, 110, 10):
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "loss/text": 6.0 - step / 50,
                        "moe/entropy/layer1": 0.8,
                        "moe/entropy/layer2": 0.7,
                    }
                )
                + "\n"
            )
        f.write(json.dumps({"step": 50, "val/loss": 5.1, "val/ppl": math.exp(5.1)}) + "\n")
        f.write(json.dumps({"step": 100, "val/loss": float("nan")}) + "\n")
        f.write('{"step": 110, "loss/te')  # a run still writing: torn last line
    (run / "eval.json").write_text(json.dumps([{"text/unigram_ppl": 400.0}]))
    rep = run / "routing_report"
    rep.mkdir()
    (rep / "report.md").write_text(
        "# Routing report\n\n## Normalised routing entropy per layer\n\n"
        "| source | L1 | L2 |\n|---|---:|---:|\n| text/prose | 0.791 | 0.731 |\n"
        "| image generation | 0.807 | 0.858 |\n\n## Top-25% expert IoU\n"
    )
    return run


def test_series_skips_torn_lines_and_non_finite_values(tmp_path):
    tool = _tool()
    records = tool.read_metrics(str(_run_dir(tmp_path) / "metrics.jsonl"))
    assert tool.series(records, "val/loss") == ([50], [5.1])
    steps, values = tool.series(records, "loss/text")
    assert steps == list(range(10, 110, 10)) and values[0] == 6.0 - 0.2
    assert tool.matching_keys(records, "moe/entropy/*") == [
        "moe/entropy/layer1",
        "moe/entropy/layer2",
    ]


def test_routing_entropy_from_report_md_and_json(tmp_path):
    tool = _tool()
    rep = _run_dir(tmp_path) / "routing_report"
    assert tool.routing_entropy(str(rep)) == (
        ["text/prose", "image generation"],
        ["L1", "L2"],
        [[0.791, 0.731], [0.807, 0.858]],
    )
    (rep / "report.json").write_text(
        json.dumps({"entropy": {"a": [0.5, 0.25, 1.0]}, "layer_ids": [1, 2, 3]})
    )
    assert tool.routing_entropy(str(rep)) == (["a"], ["L1", "L2", "L3"], [[0.5, 0.25, 1.0]])


def test_main_writes_the_figures(tmp_path, capsys):
    tool = _tool()
    run = _run_dir(tmp_path)
    out = tmp_path / "img"
    scalars = ["--scalar", "moe/entropy/*", "--scalar", "missing/key"]
    assert tool.main([str(run), "--out", str(out), "--name", "t", *scalars]) == 0
    names = sorted(os.listdir(out))
    assert names == ["t_loss.png", "t_routing_entropy.png", "t_scalars.png"]
    for n in names:
        with open(out / n, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.split() == [
        str(out / n) for n in ["t_loss.png", "t_scalars.png", "t_routing_entropy.png"]
    ]
    assert abs(tool.unigram_loss(str(run)) - math.log(400.0)) < 1e-12


def test_main_without_metrics_is_a_clear_error(tmp_path, capsys):
    assert _tool().main([str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
