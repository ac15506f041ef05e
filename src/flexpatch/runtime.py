"""Small runtime helpers shared by training and inference: devices, CPU threads and loader
workers, random streams and RNG state, progress bars."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from flexpatch.errors import FlexPatchError

if TYPE_CHECKING:
    import torch  # imported where used: the torch-free data layer uses this module too

console = Console(stderr=True)
T = TypeVar("T")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present; an unavailable CUDA request is a user error, not a crash.
    Under torchrun, ``auto`` and ``cuda`` pick the GPU of the process's local rank."""
    import torch

    from flexpatch.distributed import current

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FlexPatchError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FlexPatchError(f"device {device!r} requested but no CUDA GPU is available")
    # under torchrun "cuda" means this process's GPU (its local rank's); "cuda:N" stays N
    return current().device(dev) if dev.index is None else dev


CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2 quota: "max 100000" or "200000 100000"
MAX_AUTO_WORKERS = 4


def available_cores(cpu_max: Path = CPU_MAX) -> int:
    """The cores this process may use: its CPU affinity (else ``os.cpu_count()``), capped by a
    cgroup CPU quota (a container limited to 2 CPUs on a 64-core host gets 2, not 64)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_quota(cpu_max)
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_quota(cpu_max: Path) -> int | None:
    """CPUs allowed by a cgroup v2 quota, rounded up; None without one (or unreadable)."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        return None if quota == "max" else max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        return None


def default_workers(cores: int) -> int:
    """Loader processes for ``cores``: none on 2 cores or fewer (a worker there only takes a core
    from the step's own threads: measured several times slower than 1 thread without workers),
    else half the cores, at most :data:`MAX_AUTO_WORKERS`."""
    return 0 if cores <= 2 else min(MAX_AUTO_WORKERS, cores // 2)


@dataclass(frozen=True)
class CpuPlan:
    """Torch's intra-op threads and the loader workers of a run, and the cores they share."""

    cores: int
    threads: int
    workers: int

    def describe(self) -> str:
        """``2 cores: 2 threads, 0 loader workers``."""
        return (
            f"{self.cores} cores: {self.threads} thread{'s' * (self.threads != 1)}, "
            f"{self.workers} loader worker{'s' * (self.workers != 1)}"
        )


def cpu_plan(
    threads: int | None = None,
    workers: int | None = None,
    cores: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> CpuPlan:
    """Threads and workers for a run: what the user gave, else chosen from the cores.

    Args:
        threads: torch intra-op threads (``--threads``); None: ``OMP_NUM_THREADS`` when set (torch
            reads it itself), else the cores the workers leave (at least 1).
        workers: loader processes (``--workers``); None: :func:`default_workers`.
        cores: the cores available; None: :func:`available_cores`, shared by the processes torchrun
            started on this machine (``LOCAL_WORLD_SIZE``).
        environ: the environment read for ``OMP_NUM_THREADS`` (default ``os.environ``).
    """
    env = os.environ if environ is None else environ
    if cores is None:  # torchrun's processes on this machine share its cores
        cores = max(1, available_cores() // (_env_int(env, "LOCAL_WORLD_SIZE") or 1))
    for name, value in (("threads", threads), ("workers", workers)):
        if value is not None and value < (1 if name == "threads" else 0):
            raise FlexPatchError(f"--{name} must be >= {1 if name == 'threads' else 0}, got {value}")
    workers = default_workers(cores) if workers is None else workers
    if threads is None:
        threads = _env_int(env, "OMP_NUM_THREADS") or max(1, cores - workers)
    return CpuPlan(cores, threads, workers)


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    """A positive integer setting of the environment, None when unset or not one."""
    try:
        value = int(environ.get(name, ""))
    except ValueError:
        return None
    return value if value >= 1 else None


def apply_threads(plan: CpuPlan) -> None:
    """Set torch's intra-op threads to the plan's (torch's own default is every core, whatever
    the loader workers and the affinity or quota leave)."""
    import torch

    if torch.get_num_threads() != plan.threads:
        torch.set_num_threads(plan.threads)


def check_writable(folder: str | Path, what: str = "output folder") -> None:
    """Fail before any work when ``folder`` cannot be created or written; creates nothing.

    Args:
        folder: the folder a command will write into (it may not exist yet).
        what: how the message names it.
    """
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "it" if existing == folder else f"{existing}"
        raise FlexPatchError(f"{folder}: cannot create {what}, {where} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FlexPatchError(f"{folder}: {what} is not writable (permission denied on {existing})")


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from ``parts``, stable across processes and Python runs (unlike ``hash``)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(*parts: int | str) -> torch.Generator:
    """The CPU ``torch.Generator`` of a random stream: one int seeds it as it is; several parts
    (a name for the stream, the seed, the step...) are hashed by :func:`derive_seed`.

    ``generator(seed)`` is ``torch.Generator().manual_seed(seed)``;
    ``generator("flexpatch-step", seed, step)`` gives every step its own stream.
    """
    import torch

    if len(parts) == 1 and isinstance(parts[0], int):
        return torch.Generator().manual_seed(parts[0])
    return torch.Generator().manual_seed(derive_seed(*parts))


def numpy_rng(*keys: int) -> np.random.Generator:
    """The numpy generator of a random stream: ``default_rng(seed)``, or of the tuple of
    ``keys`` (the seed, a round, a case...), which numpy's ``SeedSequence`` mixes itself."""
    return np.random.default_rng(keys[0] if len(keys) == 1 else keys)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop touches, so that ``--resume`` continues exactly."""
    import torch

    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    # generators take their state as a CPU byte tensor, wherever a checkpoint was mapped to
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


PLAIN_INTERVAL = 10.0  # seconds between plain progress lines off a terminal


class ProgressBar(Progress):
    """rich's progress bar on a terminal; elsewhere (a log file, a pipe) plain lines.

    Off a terminal rich draws nothing until the end, so a long run into a log file would be
    silent: there the bar prints one line per task every ``interval`` seconds and once at
    the end instead (description, n/total, percentage, elapsed time and the ``info`` field).

    A bar vanishes when its block raises: after an error only the CLI's one-line message
    stands on stderr.
    """

    def __init__(
        self,
        *columns: str | ProgressColumn,
        console: Console,
        disable: bool = False,
        transient: bool = False,
        interval: float = PLAIN_INTERVAL,
    ) -> None:
        self.plain = not disable and not console.is_terminal and not console.is_jupyter
        super().__init__(*columns, console=console, disable=disable or self.plain, transient=transient)
        self.interval = float(interval)
        self._last_line = self.get_time()

    def add_task(self, description: str, *args: Any, **fields: Any) -> TaskID:
        fields.setdefault("info", "")  # every column layout may show it
        return super().add_task(description, *args, **fields)

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._plain_lines()

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._plain_lines()

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        if exc_type is None:
            super().__exit__(exc_type, exc_val, exc_tb)
            if not self.live.transient:
                self._plain_lines(final=True)
        elif not self.disable:
            self.live.transient = True
            self.live.stop()

    def _plain_lines(self, final: bool = False) -> None:
        if not self.plain:
            return
        with self._lock:
            now = self.get_time()
            if not final and now - self._last_line < self.interval:
                return
            self._last_line = now
            lines = [plain_line(task) for task in self.tasks if task.visible]
        stream = self.console.file
        for line in lines:
            stream.write(line + "\n")
        stream.flush()


def plain_line(task: Task) -> str:
    """``train: 1200/5000 (24%) 0:02:00  loss 0.412``: one task's progress as plain text."""
    done = _count(task.completed)
    count = done if task.total is None else f"{done}/{_count(task.total)} ({task.percentage:.0f}%)"
    elapsed = timedelta(seconds=int(task.elapsed or 0))
    info = str(task.fields.get("info", "")).strip()
    return f"{task.description}: {count} {elapsed}" + (f"  {info}" if info else "")


def _count(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def progress_bar(
    disable: bool = False, *, transient: bool = False, interval: float = PLAIN_INTERVAL
) -> ProgressBar:
    """The progress bar of every command, on stderr; tasks carry a free-text field ``info``
    (loss, Dice, it/s). ``transient``: gone when done (plain lines: no final line)."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    return ProgressBar(*columns, console=console, disable=disable, transient=transient, interval=interval)


def track(
    items: Sequence[T], description: str, disable: bool = False, transient: bool = False
) -> Iterator[T]:
    """``items`` one by one, with a :func:`progress_bar` over them (rich's ``track``, on stderr)."""
    with progress_bar(disable, transient=transient) as bar:
        task = bar.add_task(description, total=len(items))
        for item in items:
            yield item
            bar.advance(task)


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError)."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
