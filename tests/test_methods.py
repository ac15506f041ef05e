"""The method registry: method.json names the method, older folders are recognised by their marker,
and a folder naming an unknown method, a newer format or a malformed window is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexpatch.errors import FlexPatchError
from flexpatch.methods import (
    FORMAT,
    METHOD_FILE,
    Method,
    get_method,
    list_methods,
    method_of,
    read_method,
    register_method,
    write_method,
)
from flexpatch.models import ModelSpec


def test_the_three_methods_are_registered_with_importable_entry_points() -> None:
    assert list_methods() == ["patchwork", "segment-then-segment", "sliding-window"]
    for name in list_methods():
        method = get_method(name)
        assert callable(method.predict_files()) and method.summary
    with pytest.raises(FlexPatchError, match="registered already"):
        register_method(Method("patchwork", "again", "x", "a:b", "a:b"))


@pytest.mark.parametrize("ndim", [2, 3])
def test_method_json_round_trips(tmp_path: Path, ndim: int) -> None:
    write_method(tmp_path, "sliding-window", (32,) * ndim, fixed_size=True)
    info = read_method(tmp_path)
    assert info == {"method": "sliding-window", "format": FORMAT, "window": [32] * ndim, "fixed_size": True}
    assert method_of(tmp_path).name == "sliding-window"


@pytest.mark.parametrize(
    ("marker", "name"),
    [
        ("patchwork.json", "patchwork"),
        ("cascade.json", "segment-then-segment"),
        ("model.json", "sliding-window"),
    ],
)
def test_folders_without_method_json_are_known_by_marker(tmp_path: Path, marker: str, name: str) -> None:
    # cascades and patchworks may hold one too; a sliding-window folder's is checked by type
    (tmp_path / "model.json").write_text(json.dumps(ModelSpec("unet", 3, 1, 2, {}).to_json()))
    if marker != "model.json":
        (tmp_path / marker).write_text("{}")
    assert read_method(tmp_path) == {"method": name, "format": 0}


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ({"method": "magic", "format": 1}, "unknown method 'magic'; this flexpatch knows"),
        ({"method": "patchwork", "format": FORMAT + 1}, f"reads up to {FORMAT}"),
        ({"method": "patchwork", "format": "1"}, "folder format '1'"),
        ({"method": "sliding-window", "format": 1, "window": [32, "a"]}, "'window' must be null or"),
        ({"method": 3}, "string 'method'"),
        ([1, 2], "string 'method'"),
    ],
)
def test_bad_method_json_is_one_line_naming_the_file(tmp_path: Path, content: object, needle: str) -> None:
    (tmp_path / METHOD_FILE).write_text(json.dumps(content))
    with pytest.raises(FlexPatchError, match=needle) as e:
        read_method(tmp_path)
    assert str(tmp_path / METHOD_FILE) in str(e.value) and "\n" not in str(e.value)


def test_not_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(FlexPatchError, match="not a flexpatch model folder"):
        method_of(tmp_path)
    with pytest.raises(FlexPatchError, match="model folder not found"):
        method_of(tmp_path / "missing")
