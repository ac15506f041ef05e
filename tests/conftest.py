"""Shared fixtures: a tiny phantom dataset made once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# two xdist workers on two cores: one thread each avoids oversubscription
if os.environ.get("PYTEST_XDIST_WORKER"):
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
