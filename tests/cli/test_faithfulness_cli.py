"""``daamkit faithfulness``: images, plots and ``faithfulness.json`` written whole, never over an earlier
result silently; every bad input one line, exit 2 and nothing written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from daamkit.cli import main

MODEL = str(Path(__file__).resolve().parents[2] / "src" / "daamkit" / "world" / "model")
PROMPT = "a red circle and a blue square"


def args(out, *extra) -> list[str]:
    return ["faithfulness", "--model", MODEL, "--prompt", PROMPT, "--out", str(out), "--steps", "4",
            "--taus", "0.4", "0.6", "--no-progress", *extra]


def test_writes_images_plots_and_json(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(args(out, "--word", "red", "--swap", "red=blue")) == 0
    for name in ("image.png", "counterfactual.png", "change.png", "map.png", "counterfactual_plot.png",
                 "deletion_curves.png", "edited/tau_0.4.png", "edited/tau_0.6.png", "summary.json"):
        assert (out / name).is_file(), name
    result = json.loads((out / "faithfulness.json").read_text())
    cf, curve = result["counterfactual"], result["curve"]
    assert cf["counterfactual_prompt"] == "a blue circle and a blue square" and cf["swap"] == "blue"
    assert -1 <= cf["spearman"] <= 1 and 0 <= cf["auc"] <= 1
    assert curve["kind"] == "deletion" and curve["taus"] == [0.4, 0.6]
    assert len(curve["map"]["effect"]) == 2 and len(curve["random"]["offsets"]) == 2
    assert result["files"]["image"] == str(out / "image.png")
    text = capsys.readouterr().out
    assert "Spearman" in text and "wrote" in text
    # an earlier result is replaced only when asked
    assert main(args(out, "--word", "circle", "--scale", "3")) == 2
    assert "already holds files" in capsys.readouterr().err
    assert main(args(out, "--word", "circle", "--scale", "3", "--random-regions", "2", "--taus", "0.5",
                     "--overwrite")) == 0
    curve = json.loads((out / "faithfulness.json").read_text())["curve"]
    assert curve["kind"] == "insertion" and curve["taus"] == [0.5] and len(curve["random"]["offsets"][0]) == 2
    assert (out / "insertion_curves.png").is_file() and not (out / "deletion_curves.png").exists()
    assert all(v is None or math.isfinite(v) for v in curve["map"]["effect"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--word", "red", "--swap", "green=blue"], "must replace the word under test"),
        (["--word", "green"], "'green' is not a word of the prompt"),
        (["--word", "red", "--swap", "red"], "must be WORD=REPLACEMENT"),
        (["--word", "red", "--scale", "1"], "not 1"),
        (["--word", "red", "--taus", "1.5"], "must lie in [0, 1]"),
        (["--word", "red", "--size", "30"], "multiples of 8"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(args(out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())
