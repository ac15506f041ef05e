"""Patch-size sweeps and model comparison (the hypernetwork paper's Tables 1 and 2, Wilcoxon tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import wilcoxon

from conftest import assert_one_line_error, run_cli
from flexpatch.data.dataset import load_case, load_dataset
from flexpatch.errors import FlexPatchError
from flexpatch.evaluate.stats import compare, dice_table, paired, wilcoxon_tests
from flexpatch.evaluate.sweep import (
    context_error,
    parse_sizes,
    plot_sweep,
    random_sizes,
    run_sweep,
    summarize,
    write_rows,
)
from flexpatch.infer.predictor import load_model
from flexpatch.train.config import TrainConfig
from flexpatch.train.loop import train


def test_parse_sizes() -> None:
    assert parse_sizes("32:64:16", 3, (8, 8, 8)) == [(32,) * 3, (48,) * 3, (64,) * 3]
    assert parse_sizes("16,24", 2, (8, 8)) == [(16, 16), (24, 24)]
    with pytest.raises(FlexPatchError, match="divisor 8"):
        parse_sizes("30:40:2", 3, (8, 8, 8))
    with pytest.raises(FlexPatchError, match="start:stop:step"):
        parse_sizes("a:b", 3, (8, 8, 8))


def test_random_sizes_valid_and_reproducible() -> None:
    sizes = random_sizes(50, 16, 64, (8, 8, 16), seed=3)
    assert sizes == random_sizes(50, 16, 64, (8, 8, 16), seed=3)
    assert sizes != random_sizes(50, 16, 64, (8, 8, 16), seed=4)
    for s in sizes:
        assert all(16 <= v <= 64 and v % d == 0 for v, d in zip(s, (8, 8, 16)))
    assert len({s for s in sizes}) > 10  # anisotropic variety


def _fake_rows(seed: int = 0) -> list[dict]:
    """Two models over 4 cases x 5 sizes x 2 classes, B better than A by a noisy margin."""
    rng = np.random.default_rng(seed)
    rows = []
    for model, shift in (("A", 0.0), ("B", 0.05)):
        for case in range(4):
            for size in (16, 24, 32, 40, 48):
                for cls in ("liver", "kidney"):
                    iso = size != 40
                    rows.append(
                        {
                            "model": model,
                            "size": f"{size}x{size}x{size}" if iso else f"{size}x16x32",
                            "isotropic": iso,
                            "volume": size**3,
                            "case": f"c{case}",
                            "class": cls,
                            "dice": float(np.clip(0.6 + shift + rng.normal(0, 0.05), 0, 1)),
                        }
                    )
    return rows


def test_wilcoxon_matches_scipy_on_the_same_pairs() -> None:
    rows = _fake_rows()
    tests = wilcoxon_tests(rows)
    avg = next(t for t in tests if t["class"] == "average")

    # independent pairing: mean over classes per (case, size), in the same key order
    def per_key(model: str) -> dict[tuple, float]:
        acc: dict[tuple, list[float]] = {}
        for r in rows:
            if r["model"] == model:
                acc.setdefault((r["case"], r["size"]), []).append(r["dice"])
        return {k: float(np.mean(v)) for k, v in acc.items()}

    a, b = per_key("A"), per_key("B")
    keys = sorted(a)
    expected = wilcoxon([a[k] for k in keys], [b[k] for k in keys]).pvalue
    assert avg["n"] == 20 and avg["p"] == pytest.approx(expected)
    liver = next(t for t in tests if t["class"] == "liver")
    x, y = paired(rows, "A", "B", "liver")
    assert liver["p"] == pytest.approx(wilcoxon(x, y).pvalue) and len(x) == 20


def test_tables_all_and_isotropic(tmp_path: Path) -> None:
    rows = _fake_rows()
    t1, t2 = dice_table(rows), dice_table(rows, isotropic_only=True)
    liver_a = [r["dice"] for r in rows if r["model"] == "A" and r["class"] == "liver"]
    assert t1["A"]["liver"] == pytest.approx(np.mean(liver_a))
    liver_a_iso = [r["dice"] for r in rows if r["model"] == "A" and r["class"] == "liver" and r["isotropic"]]
    assert t2["A"]["liver"] == pytest.approx(np.mean(liver_a_iso))
    assert t1["B"]["average"] > t1["A"]["average"]
    write_rows(rows, tmp_path)
    report = compare([tmp_path])
    assert report["table1_all_sizes"]["A"]["liver"] == pytest.approx(t1["A"]["liver"])
    assert report["n_sizes"] == 5 and report["n_cases"] == 4


def test_sweep_on_tiny_phantom(tiny_abdomen: Path, tmp_path: Path) -> None:
    config = TrainConfig(patch="16", steps=2, batch=1, val_every=2, workers=0, model_kwargs={"channels": 4})
    train(tiny_abdomen, tmp_path / "m", config, progress=False)
    model = load_model(tmp_path / "m", device="cpu")
    ds = load_dataset(tiny_abdomen)
    sizes = parse_sizes("16:32:16", 3, model.divisor) + random_sizes(2, 16, 32, model.divisor)
    rows = run_sweep(model, ds.test, sizes, progress=False, label="tiny")
    n_classes = len(model.plan.labels) - 1
    assert len(rows) == len(sizes) * len(ds.test) * n_classes
    assert all(0.0 <= r["dice"] <= 1.0 or np.isnan(r["dice"]) for r in rows)
    csv_path, json_path = write_rows(rows, tmp_path / "report")
    assert csv_path.read_text().count("\n") == len(rows) + 1
    assert set(json.loads(json_path.read_text())["summary"]["tiny"]) == {"x".join(map(str, s)) for s in sizes}
    png = plot_sweep(rows, tmp_path / "report" / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summarize(rows)["tiny"]["16x16x16"]["mean"] >= 0.0


def test_context_error_counts_voxels_given_the_other_side() -> None:
    truth = np.zeros((4, 6), np.int16)
    truth[:, :2], truth[:, 4:] = 4, 5  # right kidney 8 voxels, left kidney 8 voxels
    seg = truth.copy()
    seg[0, :2] = 5  # two right voxels called left
    seg[1, 4:] = 4  # two left voxels called right
    seg[2, 4:] = 0  # two left voxels missed: a Dice error, not a side error
    assert context_error(seg, truth, [(4, 5)]) == pytest.approx(4 / 16)
    assert np.isnan(context_error(seg, truth, []))
    assert np.isnan(context_error(seg, np.zeros_like(truth), [(4, 5)]))


def test_sweep_rows_carry_the_side_error_of_the_phantoms_kidneys(tiny_abdomen: Path, tmp_path: Path) -> None:
    assert load_dataset(tiny_abdomen).mirrored_pairs == (("kidney_left", "kidney_right"),)
    config = TrainConfig(patch="16", steps=1, batch=1, val_every=1, workers=0, model_kwargs={"channels": 4})
    train(tiny_abdomen, tmp_path / "m", config, progress=False)
    model = load_model(tmp_path / "m", device="cpu")
    case = load_dataset(tiny_abdomen).test[0]
    rows = run_sweep(model, [case], [(16, 16, 16)], progress=False)
    volume, truth = load_case(case, 3, model.plan.labels)
    seg = model.probabilities(volume, (16, 16, 16)).argmax(0)
    labels = model.plan.labels
    want = context_error(seg, truth.data, [(labels["kidney_left"], labels["kidney_right"])])
    assert all(r["context_error"] == pytest.approx(want, nan_ok=True) for r in rows)
    assert all(r["image"] == "x".join(map(str, model.prepare(volume)[0].shape[2:])) for r in rows)


def test_compare_draws_every_model_in_one_png_and_names_its_case_count(tmp_path: Path) -> None:
    write_rows(_fake_rows(), tmp_path / "report")
    png = tmp_path / "cmp.png"
    done = run_cli("compare", tmp_path / "report", "--png", png)
    assert done.returncode == 0, done.stderr
    assert "the p-values rest on 4 paired cases" in done.stdout
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert_one_line_error(run_cli("compare", tmp_path / "report", "--png", png), "cmp.png: exists")
