"""Defaults that fit the machine: threads and loader workers from the cores, the hypernetwork's
subset, progress lines in a log file."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flexpatch import runtime
from flexpatch.errors import FlexPatchError
from flexpatch.runtime import CpuPlan, available_cores, cpu_plan, default_workers
from flexpatch.train.config import TrainConfig


@pytest.mark.parametrize(
    ("text", "cores"),
    [("max 100000", None), ("150000 100000", 2), ("100000 100000", 1), ("50000 100000", 1), ("junk", None)],
)
def test_cgroup_quota_caps_the_cores(tmp_path: Path, text: str, cores: int | None) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text(text + "\n")
    own = available_cores(tmp_path / "absent")
    assert own >= 1
    assert available_cores(cpu_max) == (own if cores is None else min(own, cores))


@pytest.mark.parametrize(("cores", "workers"), [(1, 0), (2, 0), (3, 1), (4, 2), (8, 4), (64, 4)])
def test_default_workers(cores: int, workers: int) -> None:
    assert default_workers(cores) == workers


def test_plan_from_the_cores_the_user_and_the_environment() -> None:
    assert cpu_plan(cores=2, environ={}) == CpuPlan(2, 2, 0)
    assert cpu_plan(cores=16, environ={}) == CpuPlan(16, 12, 4)
    assert cpu_plan(cores=2, workers=2, environ={}) == CpuPlan(2, 1, 2)  # at least one thread
    assert cpu_plan(cores=16, environ={"OMP_NUM_THREADS": "3"}) == CpuPlan(16, 3, 4)
    assert cpu_plan(threads=5, cores=16, environ={"OMP_NUM_THREADS": "3"}).threads == 5  # the flag wins
    assert cpu_plan(cores=4, environ={"OMP_NUM_THREADS": "x"}).threads == 2  # unreadable: ignored
    assert cpu_plan(cores=2, environ={}).describe() == "2 cores: 2 threads, 0 loader workers"
    assert CpuPlan(1, 1, 1).describe() == "1 cores: 1 thread, 1 loader worker"
    # torchrun's processes on one machine share its cores (LOCAL_WORLD_SIZE processes)
    own = available_cores()
    assert cpu_plan(environ={"LOCAL_WORLD_SIZE": "2"}).cores == max(1, own // 2)
    assert cpu_plan(environ={"LOCAL_WORLD_SIZE": str(4 * own)}) == CpuPlan(1, 1, 0)
    for bad in ({"threads": 0}, {"workers": -1}):
        with pytest.raises(FlexPatchError, match="must be >="):
            cpu_plan(cores=2, **bad)


def test_apply_threads_sets_torch() -> None:
    import torch

    before = torch.get_num_threads()
    try:
        runtime.apply_threads(CpuPlan(2, 1, 0))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_config_workers_default_from_the_cores_explicit_kept_old_configs_load() -> None:
    assert TrainConfig().workers == default_workers(available_cores())
    explicit = TrainConfig(workers=3)
    assert TrainConfig.from_json(explicit.to_json()).workers == 3  # honoured and saved
    old = TrainConfig(workers=2).to_json()  # what every run saved before the default moved
    assert TrainConfig.from_json(old) == TrainConfig(workers=2)
    del old["workers"]  # a config without the field still loads, with this machine's choice
    assert TrainConfig.from_json(old).workers == TrainConfig().workers


def test_cli_defaults() -> None:
    from flexpatch.cli.predict import predict
    from flexpatch.cli.train import train

    params = inspect.signature(train).parameters
    assert params["workers"].default is None and params["threads"].default is None
    assert params["hyper_subset"].default == "norm+last"  # ~plain cost; "all" ~3x (benchmarks/hyper_cost.py)
    assert inspect.signature(predict).parameters["threads"].default is None


def test_train_into_a_log_file_shows_progress_and_the_cpu_choice(tiny_abdomen: Path, tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    args = ["train", tiny_abdomen, "--out", tmp_path / "m", "--patch", "16", "--steps", 3, "--batch", 1,
            "--val-every", 3, "--val-patch", "32", "--device", "cpu", "--threads", 1]  # fmt: skip
    with log.open("w") as file:  # a file, not a terminal: rich would draw nothing
        proc = subprocess.run(
            [sys.executable, "-m", "flexpatch", *map(str, args)],
            stdout=file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "200"},
            timeout=300,
        )
    text = log.read_text()
    assert proc.returncode == 0, text
    cores = available_cores()
    assert f"cpu {cores} cores: 1 thread, {default_workers(cores)} loader worker" in text
    assert re.search(r"^\S.*: 3/3 \(100%\) \d+:\d\d:\d\d", text, re.MULTILINE), text
    assert "\x1b[" not in text  # plain lines, no terminal escapes


def test_hyper_cost_smoke_reports_a_table_and_leaves_benchmarks_md_alone(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    recorded = root / "BENCHMARKS.md"
    before = recorded.stat().st_mtime if recorded.exists() else None
    cmd = [sys.executable, str(root / "benchmarks" / "hyper_cost.py"), "--smoke", "--work", str(tmp_path)]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| --hyper norm+last |" in text and "| --hyper all |" in text and "Target" in text
    assert (recorded.stat().st_mtime if recorded.exists() else None) == before
