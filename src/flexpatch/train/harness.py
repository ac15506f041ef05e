"""What every training method shares around its steps: the model folder it may write, resume, and
the loop's cadence, checkpoints, divergence guard, progress and JSONL log (:class:`Harness`),
and the training curves drawn from that log (:func:`training_log`).

A run writes only into a folder that is new, empty, or its own (``resume``), unless the user says
``overwrite``: a model folder from another run is never replaced by accident. On resume the run's
config is the checkpoint's own (not ``config.json``, which another run may have half-rewritten);
a given config must equal it except for the settings a method declares free (more steps or rounds,
other workers), which then take the given value.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexpatch.checkpoint import save_checkpoint
from flexpatch.data.io import TEMP_PREFIX, write_text
from flexpatch.errors import FlexPatchError
from flexpatch.runtime import check_writable, progress_bar
from flexpatch.train.step import Divergence

# Files whose presence marks a folder as written by a flexpatch training run (any method).
_MARKS = ("config.json", "model.json", "fingerprint.json", "patchwork.json", "resume.pt", "cascade.json")


def claim_folder(folder: Path, what: str, *, resume: bool, overwrite: bool) -> None:
    """Make ``folder`` this run's, failing before any work when that would destroy another's files.

    A new or empty folder is taken; with ``resume`` the folder is the run's own; with ``overwrite``
    a model folder of an earlier flexpatch run is emptied first. Any other folder with files is
    refused, naming one, even with ``overwrite``: it may hold what a user cannot get back.
    Temporary files of a killed run are removed in every case.
    """
    check_writable(folder, what)
    if not folder.is_dir():
        return
    for stale in folder.rglob(f"{TEMP_PREFIX}*"):
        stale.unlink(missing_ok=True)
    present = sorted(p.name for p in folder.iterdir())
    if resume or not present:
        return
    named = f"{present[0]}{' ...' if len(present) > 1 else ''}"
    if not overwrite:
        raise FlexPatchError(
            f"{folder}: {what} is not empty (holds {named}); "
            "use --resume to continue its run or --overwrite to replace it"
        )
    if not any((folder / mark).is_file() for mark in _MARKS):
        raise FlexPatchError(
            f"{folder}: not a flexpatch model folder (holds {named}); --overwrite replaces only those"
        )
    for entry in folder.iterdir():
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def resume_checkpoint(last: Path, best: Path, hint: str = "") -> Path:
    """``last``, the checkpoint a resumed run continues from; when it is missing, say so, and why
    ``best`` (present when the run's first write of ``last`` failed) cannot stand in: it holds the
    best weights only, not the optimiser and random state from which the run goes on exactly."""
    if last.is_file():
        return last
    if best.is_file():
        raise FlexPatchError(
            f"{last}: nothing to resume from; {best.name} holds only the best weights, not the "
            f"optimiser and random state an exact resume needs{hint}"
        )
    raise FlexPatchError(f"{last}: nothing to resume from")


def resume_settings(
    path: Path,
    saved: Mapping[str, Any],
    given: Mapping[str, Any] | None,
    changes: Mapping[str, Any] | None,
    free: Iterable[str],
) -> dict[str, Any]:
    """The resumed run's settings (as JSON): ``saved`` (the checkpoint's own), with ``changes`` or a
    whole ``given`` config that may differ from it only in the ``free`` settings.

    Args:
        path: the checkpoint, named in errors.
        saved: the settings stored in the checkpoint.
        given: a full config for the resumed run, or None.
        changes: settings to change (only ``free`` ones), when ``given`` is None.
        free: settings that leave the finished part of the run valid (steps, rounds, workers, ...).
    """
    free = tuple(free)
    saved = _as_json(saved)
    if given is None:
        fixed = sorted(set(changes or {}) - set(free))
        if fixed:
            raise FlexPatchError(f"{path}: a resumed run cannot change {', '.join(fixed)}")
        return {**saved, **_as_json(changes or {})}
    ours = _as_json(given)
    changed = [k for k in sorted(set(ours) | set(saved)) if k not in free and ours.get(k) != saved.get(k)]
    if changed:
        raise FlexPatchError(
            f"{path}: cannot resume with a different {', '.join(changed)} "
            f"(saved {', '.join(f'{k}={saved.get(k)!r}' for k in changed)})"
        )
    return ours


def _as_json(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Compared as JSON: a tuple given here equals the list read back from a file."""
    return json.loads(json.dumps(dict(settings)))


@dataclass
class Harness:
    """The part of a training loop every method shares, so that each writes only its own step.

    A run counts steps (or rounds) up to ``total``; it validates every ``val_every`` and at the end,
    keeps the best weights in ``best_name`` (the first validation always keeps them, a NaN never
    improves them) and where it stands in ``last_name`` every ``save_every`` (by default at each
    validation) and at the end, so that ``resume`` goes on from there. Skipped steps (a non-finite
    gradient) are counted, and too many in a row stop the run (:class:`Divergence`).
    """

    folder: Path
    total: int
    val_every: int
    save_every: int | None = None
    best: float = -1.0
    best_name: str = "model_best.pt"
    last_name: str = "model_last.pt"
    divergence: Divergence = field(default_factory=Divergence)
    main: bool = True  # under torchrun only the main process writes; the others keep count alike

    def validation_due(self, step: int) -> bool:
        return step % self.val_every == 0 or step == self.total

    def save_due(self, step: int) -> bool:
        return step % (self.save_every or self.val_every) == 0 or step == self.total

    def taken(self, step: int, stepped: bool, record: dict[str, Any]) -> dict[str, Any]:
        """Count a step (raising when the run diverged); mark a skipped one in its log ``record``."""
        self.divergence.update(stepped, step, str(self.folder))
        if not stepped:
            record["skipped"] = True
        return record

    def keep_if_best(self, value: float, weights: Callable[[], dict[str, Any]]) -> bool:
        """Save ``weights()`` as the best when ``value`` improves on it (or nothing is kept yet)."""
        path = self.folder / self.best_name
        improved = value > self.best
        self.best = value if improved else self.best
        if not self.main or not (improved or not path.is_file()):
            return False
        save_checkpoint(path, weights())
        return True

    def save_last(self, state: dict[str, Any]) -> None:
        if self.main:
            save_checkpoint(self.folder / self.last_name, state)

    @contextmanager
    def progress(self, name: str, start: int, enabled: bool) -> Iterator[Callable[[int, str], None]]:
        """One progress bar from ``start`` to ``total``; yields ``update(step, info)``."""
        with progress_bar(disable=not enabled) as bar:
            task = bar.add_task(name, total=self.total, completed=start)
            yield lambda step, info: bar.update(task, completed=step, info=info)


@contextmanager
def jsonl_log(path: Path) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Append one JSON line per call, written at once: a killed run's log ends at its last step.

    Unbuffered, so that a failed write (disk full) is one error, raised where it happens and not
    again when the file is closed; it names the log (a write's OSError names no file).
    """
    log = path.open("ab", buffering=0)

    def write(record: dict[str, Any]) -> None:
        line = (json.dumps(record) + "\n").encode()
        try:
            while line:  # a file may take part of a write when the disk fills: the error comes next
                line = line[log.write(line) :]
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path)) from None

    with log:
        yield write


@contextmanager
def training_log(path: Path) -> Iterator[Callable[[dict[str, Any]], None]]:
    """The run's JSONL log (:func:`jsonl_log`), each record also fed to its training curves
    (:class:`~flexpatch.train.curves.Curves`: ``progress.png`` beside the log, redrawn at each
    validation and at the end, and TensorBoard when asked). The curves start from the records the
    log holds already (a resumed run's, or an earlier stage's), so they continue, not restart."""
    from flexpatch.train.curves import Curves, read_jsonl

    with Curves(path.parent, read_jsonl(path)) as curves, jsonl_log(path) as write:

        def log(record: dict[str, Any]) -> None:
            write(record)  # first: the picture never shows a step the log lacks
            curves.add(record)

        yield log


def truncate_log(path: Path, done: Callable[[dict[str, Any]], bool]) -> None:
    """On resume, keep the log lines of what the checkpoint holds (``done``) and drop the rest, lines
    a crash cut short included, so that the log reads as one run."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if done(json.loads(line)):
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    write_text(path, "".join(keep))
