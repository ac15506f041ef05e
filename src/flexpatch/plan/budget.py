"""A memory budget: read from text (``8GB``, ``2GiB``, ``auto``), the memory free now, and bytes in words."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

import torch

from flexpatch.errors import FlexPatchError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")


def parse_budget(text: str | int, device: str | torch.device = "cpu") -> int:
    """``"8GB"`` (10^9 bytes), ``"2GiB"`` (2^30), ``"512MB"``, bytes as an int, or ``"auto"``: free now."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    elif str(text).strip().lower() == "auto":
        value = available_memory(device)
    else:
        match = _BUDGET.match(str(text).lower())
        if match is None or match[2] not in _UNITS:
            raise FlexPatchError(f"memory budget {text!r}: write it as 8GB, 2GiB, 512MB or auto")
        value = int(float(match[1]) * _UNITS[match[2]])
    if value <= 0:
        raise FlexPatchError(f"memory budget {text!r} must be positive")
    return value


def available_memory(device: str | torch.device) -> int:
    """Free bytes on ``device``: CUDA's free memory, or the system's available RAM on the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        with open("/proc/meminfo") as f:
            found = re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.MULTILINE)
        if found:
            return int(found[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def format_bytes(n: float) -> str:
    """Decimal units, as budgets are usually written (``8GB``)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def resident_bytes() -> int:
    """The process's resident memory now (Linux ``/proc``); 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


CPU_BATCH_VOXELS = 1 << 21  # a window batch on the CPU holds at most 128^3 voxels


def cpu_window_batch(window: Sequence[int], batch_size: int) -> int:
    """The window batch on the CPU: at most ``batch_size``, and at most :data:`CPU_BATCH_VOXELS`
    voxels per call. Why: batching large windows brings CPU convolutions no speed, while each
    window's activations cost memory (four 128^3 windows of a narrow U-Net, about 1 GB); small
    windows still go several per call, which saves the per-call overhead."""
    return max(1, min(int(batch_size), CPU_BATCH_VOXELS // max(1, math.prod(window))))
