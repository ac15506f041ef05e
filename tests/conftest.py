"""Shared fixtures: a tiny phantom dataset made once per session; the CLI run as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# two xdist workers on two cores: one thread each avoids oversubscription. Through the environment
# too: the CLI's thread plan (runtime.cpu_plan) reads OMP_NUM_THREADS, and a command invoked in-process
# would otherwise give this worker every core for the rest of the session (the suite ran 2-3x slower)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """Small models run faster single-threaded on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_abdomen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3D abdomen phantom: 4 training + 2 test cases of 32^3 voxels at 6 mm."""
    from flexpatch.data.phantom import make_phantom

    out = tmp_path_factory.mktemp("phantom3d")
    return make_phantom(
        out,
        cases=4,
        shape=(32, 32, 32),
        ndim=3,
        kind="abdomen",
        seed=0,
        test_cases=2,
        spacing=(6.0, 6.0, 6.0),
        progress=False,
    )


@pytest.fixture(scope="session")
def tiny_cells(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2D cells phantom: 4 training + 2 test images of 64^2."""
    from flexpatch.data.phantom import make_phantom

    out = tmp_path_factory.mktemp("phantom2d")
    return make_phantom(
        out, cases=4, shape=(64, 64), ndim=2, kind="cells", seed=0, test_cases=2, progress=False
    )


def run_cli(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m flexpatch ARGS`` as a real process (one thread, a wide terminal): exit code,
    stdout and stderr as a user's shell sees them, which ``CliRunner`` does not show."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "flexpatch", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """The CLI's error contract: exit code 2, one line ``error: ...`` holding every needle, no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
