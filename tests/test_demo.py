"""The README's main job, `flexpatch demo`, end to end on a small phantom and a token budget."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from flexpatch.cli import app
from flexpatch.demo import MODELS, as_json, run_demo


def test_demo_trains_fp_and_ap_with_context_and_reports_every_window(tmp_path: Path) -> None:
    windows = (16, 32, 48)  # 48 exceeds the 32^3 image
    summary = run_demo(
        tmp_path, steps=2, device="cpu", progress=False, shape=(32, 32, 32), cases=(3, 1), windows=windows
    )
    assert set(summary) == set(MODELS)
    for by_size in summary.values():
        assert list(by_size) == [f"{w}x{w}x{w}" for w in windows]
        assert all(0.0 <= row["mean"] <= 1.0 for row in by_size.values())
        # a window beyond the image takes each axis whole: the same answer as the whole image
        assert by_size["48x48x48"] == by_size["32x32x32"]
    assert (tmp_path / "dice_vs_patch_size.png").read_bytes()[:4] == b"\x89PNG"
    rows = (tmp_path / "sweep.csv").read_text().splitlines()
    assert len(rows) == 1 + len(MODELS) * len(windows) * 1 * 6  # 1 test case, 6 organs
    for folder, _, _, context in MODELS.values():
        assert (tmp_path / folder / "model_best.pt").is_file()
        assert json.loads((tmp_path / folder / "config.json").read_text())["context"] == context
    short = as_json(summary, (32, 32, 32))
    assert short["image"] == [32, 32, 32] and set(short["models"]) == set(MODELS)
    for name, by_edge in short["models"].items():
        assert list(by_edge) == ["16", "32", "48"]
        assert by_edge["32"] == round(summary[name]["32x32x32"]["mean"], 4)


def test_demo_command_is_registered() -> None:
    result = CliRunner().invoke(app, ["demo", "--help"])
    assert result.exit_code == 0 and "--steps" in result.output
