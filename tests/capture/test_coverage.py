"""The family table against the installed diffusers: nothing unmentioned, nothing stale, README in step."""

from __future__ import annotations

import re
from pathlib import Path

import diffusers

from daamkit.capture.coverage import NOT_SUPPORTED, coverage, markdown_table, text_conditioned_denoisers
from daamkit.capture.families import FAMILIES
from daamkit.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_every_text_conditioned_denoiser_is_in_the_table_or_says_why_not():
    found = text_conditioned_denoisers()
    assert {"UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel"} <= found.keys()
    supported = {d for f in FAMILIES for d in f.denoisers}
    unmentioned = sorted(set(found) - supported - set(NOT_SUPPORTED))
    assert not unmentioned, f"diffusers has text-conditioned denoisers the family table does not mention: {unmentioned}"


def test_no_stale_or_doubled_entries():
    found = text_conditioned_denoisers()
    supported = [d for f in FAMILIES for d in f.denoisers]
    assert len(supported) == len(set(supported)), "a denoiser is in two families"
    assert not set(supported) & set(NOT_SUPPORTED)
    assert not set(NOT_SUPPORTED) - set(found), "NOT_SUPPORTED names classes diffusers no longer has"
    assert len({f.name for f in FAMILIES}) == len(FAMILIES)
    for f in FAMILIES:
        for d in f.denoisers:
            assert (ROOT / f.tests_of(d)).is_file(), f"{f.name}: test file {f.tests_of(d)!r} of {d} is missing"
        for p in f.pipelines:
            assert hasattr(diffusers, p), f"{f.name}: {p} is not a diffusers pipeline"


def test_readme_table_is_generated_from_the_table():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- families:start -->\n(.*?)\n<!-- families:end -->", readme, re.S)
    assert m, "README.md lacks the generated family table"
    assert m.group(1).strip() == markdown_table(coverage()).strip(), (
        "README's family table is out of date: regenerate it with `daamkit families --markdown`"
    )


def test_families_command(capsys):
    assert main(["families", "--supported"]) == 0
    out = capsys.readouterr().out
    assert "FluxTransformer2DModel" in out and "WanVACETransformer3DModel" not in out
    assert main(["families", "--json"]) == 0
    assert '"denoiser": "WanTransformer3DModel"' in capsys.readouterr().out
