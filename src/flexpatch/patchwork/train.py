"""Training a deep neural patchwork: rounds of patch sets, gradient passes over them, hard mining.

The outer loop (``rounds``, DNP's num_its) draws ``num_patches`` chains per training image
(:mod:`flexpatch.patchwork.rounds`, in worker processes while the previous round trains); the
inner loop (``epochs``) runs gradient steps over that set in batches. Every ``save_every``
rounds the run's state goes to ``resume.pt``, from which ``resume`` continues exactly where it
stopped.

Under torchrun (DistributedDataParallel; gloo on the CPU, NCCL on CUDA) every process draws the
round's whole patch set alike (the same seeds: no patches travel between processes) and shuffles it
with the same generator; each trains on its contiguous share of every batch (:meth:`Dist.samples`),
and the loss is computed from statistics summed over the processes (:func:`patch_loss`'s ``total``),
so a step is the whole batch's, batch Dice included. Hard mining sees every patch's score (summed
from the processes' shares), validation splits the held-out cases, and only the main process writes
(``resume.pt``, the best weights, ``log.json``, ``progress.png``, the model). The run equals one
process's with the same ``batch_size`` to float rounding (sums reduced in another order); a block
with dropout would draw its masks per process. Each process crops every patch of a round: the CPU
work of drawing patch sets is repeated by every process, not split.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexpatch.checkpoint import load_checkpoint, save_checkpoint
from flexpatch.data.dataset import DatasetInfo, load_dataset, refuse_regions
from flexpatch.data.io import save_json
from flexpatch.distributed import Dist
from flexpatch.errors import FlexPatchError
from flexpatch.methods import write_method
from flexpatch.models.registry import check_trainable
from flexpatch.patchwork.config import PatchworkConfig
from flexpatch.patchwork.files import BEST, CONFIG, RESUME, WEIGHTS
from flexpatch.patchwork.mining import PatchPool, balance_scores, count_labels
from flexpatch.patchwork.model import PatchworkNet
from flexpatch.patchwork.predict import LoadedPatchwork
from flexpatch.patchwork.rounds import RoundJob, RoundSource, label_table, load_state
from flexpatch.patchwork.scheme import Scheme
from flexpatch.patchwork.trainer import Trainer
from flexpatch.patchwork.validate import Validator, loaded_view, mean_dice
from flexpatch.runtime import check_writable, seed_everything
from flexpatch.train.curves import Curves
from flexpatch.train.folds import split_for, write_validation
from flexpatch.train.harness import Harness, claim_folder, resume_checkpoint, resume_settings
from flexpatch.train.loop import join_processes
from flexpatch.train.step import Divergence

# Settings a resumed run may change: more rounds continue the same stream, workers don't change it.
RESUME_FREE = ("rounds", "workers", "save_every", "val_every")


def build_net(config: PatchworkConfig, scheme: Scheme, in_channels: int, num_labels: int) -> PatchworkNet:
    outputs = config.embedding_dim or (num_labels + 1 if config.categorical else num_labels)
    net = PatchworkNet(
        scheme.ndim,
        in_channels * scheme.smooth_channels,
        outputs,
        scheme.depth,
        block=config.block,
        block_options=config.block_options,
        identical_blocks=config.identical_blocks,
        intermediate_out=config.intermediate_out,
        forward_type=config.forward_type,
        final_block=config.final_block,
        interp=scheme.interp,
    )
    net.check_matrix(list(scheme.matrix))
    for k, m in enumerate(scheme.matrix):
        check_trainable(m, net.block(k).divisor, f"matrix of level {k}", config.block)
    return net


def mining_scores(
    pool: PatchPool, losses: torch.Tensor, f1: torch.Tensor, order: str, depth: int, num_labels: int
) -> np.ndarray:
    if order == "loss":
        return losses.numpy()
    if order == "f1":
        return f1.numpy()
    return balance_scores(count_labels(pool.data[f"y{depth - 1}"], num_labels + 1))


def check_training_inputs(dataset_dir: Path, out_dir: Path, config: PatchworkConfig) -> DatasetInfo:
    """Fail in seconds: dataset layout, labels, scheme, blocks and matrices, output folder."""
    config.check()
    ds = load_dataset(dataset_dir)
    refuse_regions(ds, "the patchwork")
    values, _ = label_table(ds, config)
    scheme = config.scheme_obj(ds.ndim)
    build_net(config, scheme, len(ds.channel_names), len(values))
    check_writable(out_dir, "model folder")
    if not ds.training:
        raise FlexPatchError(f"{dataset_dir}: no training cases")
    return ds


def train_patchwork(
    dataset_dir: str | Path,
    out_dir: str | Path,
    config: PatchworkConfig | None = None,
    device: str = "auto",
    progress: bool = True,
    resume: bool = False,
    changes: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train a patchwork on a dataset's training cases; write ``patchwork.json`` and the weights.

    ``config.val_fraction`` of the cases are held out and scored every ``val_every`` rounds (see
    :mod:`flexpatch.patchwork.validate`). With ``resume``, continue from ``out_dir/resume.pt``
    (written every ``save_every`` rounds) with its saved config; a given ``config`` must equal it
    but for :data:`RESUME_FREE` (``rounds`` to train longer, ``workers``, ``save_every``, ``val_every``);
    without one, ``changes`` may set those on the saved config (the checkpoint is read once).
    A non-empty ``out_dir`` is refused unless ``resume`` or ``overwrite`` (see
    :func:`flexpatch.train.harness.claim_folder`). Under torchrun every process calls this, with the
    same arguments; ``config.batch_size`` is the global batch (see the module's docstring).
    """
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    dist, dev = join_processes(device)  # under torchrun: this process's place and device
    saved = dist.on_main(lambda: load_resume(out_dir, config, changes)) if resume else None
    config = saved["config"] if saved else (config or PatchworkConfig())
    ds = dist.on_main(lambda: start_folder(dataset_dir, out_dir, config, (resume, overwrite), dist))
    values, ignore = label_table(ds, config)
    scheme = config.scheme_obj(ds.ndim)
    seed_everything(config.seed)
    net = build_net(config, scheme, len(ds.channel_names), len(values)).to(dev)
    trainer = Trainer(net, config, len(values), dev, str(out_dir), dist)
    run, best = restore(saved, trainer, out_dir / RESUME) if saved else (RunState(), -1.0)
    # the harness counts rounds: validation every val_every, resume.pt every save_every, and the best
    h = Harness(
        out_dir, config.rounds, config.val_every, config.save_every, best, BEST, RESUME, main=dist.main
    )
    cases, val_cases = _split(ds, dataset_dir, config)
    validator = (
        Validator.load(val_cases, ds.ndim, values, ignore, config.batch_size, dist) if val_cases else None
    )
    view = loaded_view(net, scheme, asdict(config), values, len(ds.channel_names), trainer.embedding, dev)
    states = [load_state(c, ds.ndim, scheme, config, values, ignore) for c in cases]
    source = RoundSource(RoundJob(states, scheme, config), config.workers)
    try:
        names = {str(v): n for n, v in ds.labels.items()}
        train_rounds(run, trainer, source, (validator, view), h, names, progress)
    finally:
        source.close()
    result = save_model(out_dir, net, trainer, config, ds, values, ignore, run, h.best, write=dist.main)
    dist.barrier()  # the model folder is complete: the main process has written it
    if isinstance(config.fold, int):  # as nnU-Net: a fold's validation predictions
        write_validation(dataset_dir, out_dir, [c.id for c in val_cases], device)
    return result


def _split(ds: DatasetInfo, dataset_dir: Path, config: PatchworkConfig) -> tuple[list[Any], list[Any]]:
    """The training and validation cases as the core trainer's (:func:`split_for`), but for
    ``val_fraction`` 0 without a fold: no validation."""
    if config.fold is None and config.val_fraction == 0:
        return list(ds.training), []
    return split_for(list(ds.training), dataset_dir, config, key=lambda case: case.id)


def start_folder(
    dataset_dir: Path, out_dir: Path, config: PatchworkConfig, flags: tuple[bool, bool], dist: Dist
) -> DatasetInfo:
    """The main process's checks (the inputs, a batch the processes can split) and its claim of the
    model folder, before any process trains; returns the dataset."""
    resume, overwrite = flags
    ds = check_training_inputs(dataset_dir, out_dir, config)
    dist.samples(config.batch_size)
    claim_folder(out_dir, "model folder", resume=resume, overwrite=overwrite)
    return ds


def train_rounds(
    run: RunState,
    trainer: Trainer,
    source: RoundSource,
    validation: tuple[Validator | None, LoadedPatchwork],
    h: Harness,
    names: dict[str, str],
    progress: bool,
) -> None:
    """Rounds ``run.next_round .. rounds``: a patch set each (with the hard patches kept), trained
    on; validation and ``resume.pt`` at their cadence, one log entry per round."""
    config, depth, labels = trainer.config, trainer.net.depth, trainer.num_labels
    validator, view = validation
    # the training curves (progress.png) go on from the rounds resume.pt holds, drawn at each validation
    curves = Curves(h.folder, run.log, names) if h.main else None
    start = time.perf_counter() - run.seconds()
    with h.progress("patchwork", run.next_round, progress and h.main) as update, curves or nullcontext():
        for r in range(run.next_round, config.rounds):
            source.prefetch(r + 1) if r + 1 < config.rounds else None
            run.pool = next_pool(run.pool, run.scores, source.get(r), config, depth, labels)
            loss, run.scores = run_round(run.pool, trainer, config)
            seconds = time.perf_counter() - start
            lr = trainer.opt.param_groups[0]["lr"]
            run.log.append({"round": r, "loss": loss, "lr": lr, "patches": len(run.pool), "seconds": seconds})
            run.next_round = r + 1
            if validator is not None and h.validation_due(run.next_round):
                validate_round(validator, view, trainer, run, h)
            if h.save_due(run.next_round):
                save_resume(h, trainer, config, run)
            if curves is not None:
                curves.add(run.log[-1], draw=h.validation_due(run.next_round))
            update(run.next_round, round_info(run.log[-1]))


def round_info(entry: dict[str, Any]) -> str:
    val = f" val Dice {entry['val_mean']:.3f}" if "val_mean" in entry else ""
    return f"loss {entry['loss']:.3f} patches {entry['patches']}{val}"


def weights(trainer: Trainer, run: RunState) -> dict[str, Any]:
    """What predict loads: the weights, and the mask thresholds of the last validation, if any."""
    return {
        "net": trainer.net.state_dict(),
        "embedding": trainer.embedding.state_dict() if trainer.embedding else None,
        "thresholds": run.thresholds,
    }


def validate_round(
    validator: Validator, view: LoadedPatchwork, trainer: Trainer, run: RunState, h: Harness
) -> None:
    """Score the held-out cases; log Dice per label; keep the weights when the mean is the best yet."""
    dice, run.thresholds = validator.score(view)
    mean = mean_dice(dice)
    run.log[-1].update(val_dice=dice, val_mean=mean, thresholds=run.thresholds)
    h.keep_if_best(mean, lambda: {**weights(trainer, run), "round": run.log[-1]["round"], "val_mean": mean})


@dataclass
class RunState:
    """Where a run stands between rounds: what ``resume.pt`` holds besides the weights."""

    next_round: int = 0
    log: list[dict] = field(default_factory=list)
    pool: PatchPool | None = None
    scores: tuple[torch.Tensor, torch.Tensor] | None = None
    thresholds: list[float] | None = None  # the mask thresholds tuned by the last validation

    def seconds(self) -> float:
        return self.log[-1]["seconds"] if self.log else 0.0


def save_resume(h: Harness, trainer: Trainer, config: PatchworkConfig, run: RunState) -> None:
    """Everything an exact resume needs; the patch pool only when hard mining keeps part of it."""
    state: dict[str, Any] = {
        "config": asdict(config),
        "net": trainer.net.state_dict(),
        "optimizer": trainer.opt.state_dict(),
        "embedding": trainer.embedding.state_dict() if trainer.embedding else None,
        "generator": trainer.gen.get_state(),
        "next_round": run.next_round,
        "log": run.log,
        "best": h.best,
        "thresholds": run.thresholds,
        "steps": trainer.steps,
        "divergence": asdict(trainer.divergence),  # a resumed run counts skipped steps on
    }
    # without hard mining the next round's pool is all new patches: a pure function of the round
    if config.hard_mining > 0 and run.pool is not None:
        state["pool"] = {"data": run.pool.data, "ages": run.pool.ages, "scores": run.scores}
    h.save_last(state)


def load_resume(
    out_dir: Path, config: PatchworkConfig | None, changes: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The saved run state, with its config checked against a given one (``RESUME_FREE`` may differ);
    without one, the saved config with ``changes`` (``RESUME_FREE`` settings only) is the run's."""
    path = resume_checkpoint(out_dir / RESUME, out_dir / BEST)
    saved = load_checkpoint(path)
    if not isinstance(saved.get("config"), dict):
        raise FlexPatchError(f"{path}: not a patchwork resume checkpoint (no config)")
    given = asdict(config) if config is not None else None
    # runs saved before intensity augmentation existed trained without it, and resume so
    settings = resume_settings(path, {"intensity": "none", **saved["config"]}, given, changes, RESUME_FREE)
    try:
        config = PatchworkConfig(**settings)
    except TypeError as err:
        raise FlexPatchError(f"{path}: not a patchwork resume checkpoint ({err})") from None
    if config.rounds < saved["next_round"]:
        raise FlexPatchError(f"{path}: {saved['next_round']} rounds are done already, rounds={config.rounds}")
    saved["config"] = config
    return saved


def restore(saved: dict[str, Any], trainer: Trainer, path: Path) -> tuple[RunState, float]:
    """Load the saved weights, optimiser and generator into ``trainer``; return the run's state and
    its best validation Dice so far."""
    try:
        trainer.net.load_state_dict(saved["net"])
        trainer.opt.load_state_dict(saved["optimizer"])
        if trainer.embedding is not None:
            trainer.embedding.load_state_dict(saved["embedding"])
        trainer.gen.set_state(saved["generator"])
        # absent from resume files written before they were saved: start counting afresh
        trainer.steps = int(saved.get("steps", 0))
        trainer.divergence = Divergence(**saved.get("divergence", {}))
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FlexPatchError(f"{path}: does not fit this patchwork ({reason})") from None
    run = RunState(int(saved["next_round"]), list(saved["log"]))
    run.thresholds = saved["thresholds"]
    if "pool" in saved:
        pool = saved["pool"]
        run.pool, run.scores = PatchPool(pool["data"], pool["ages"]), pool["scores"]
    return run, float(saved["best"])


def next_pool(
    pool: PatchPool | None,
    scores: tuple[torch.Tensor, torch.Tensor] | None,
    new: dict[str, torch.Tensor],
    config: PatchworkConfig,
    depth: int,
    num_labels: int,
) -> PatchPool:
    """Hard mining: keep part of the last round's patches (by loss, f1 or rarity) beside the new ones."""
    kept = None
    if pool is not None and scores is not None and config.hard_mining > 0:
        order = config.hard_mining_order
        values = mining_scores(pool, *scores, order, depth, num_labels)
        kept = pool.hard(values, config.hard_mining, order, config.hard_mining_maxage)
    return PatchPool.merge(kept, new)


def run_round(
    pool: PatchPool, trainer: Trainer, config: PatchworkConfig
) -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:
    """``epochs`` passes over the patch set; records each patch's last loss and F1 for mining (under
    torchrun every process gets all of them: each wrote its own samples', the others' are zero)."""
    trainer.net.train()
    scores = torch.zeros(2, len(pool))  # loss, F1
    values = []
    for epoch in range(config.epochs):
        for batch in pool.batches(config.batch_size, trainer.gen):
            loss, idx, per_sample, f1 = trainer.step(batch)
            if epoch == config.epochs - 1:  # each pass takes every patch once: the last one's count
                scores[0, idx], scores[1, idx] = per_sample, f1
            values.append(loss)
    if trainer.dist.active:  # x + 0 is x: the sum is each patch's own score, exactly
        scores = trainer.dist.sum(scores.to(trainer.device)).cpu()
    return float(np.mean(values)), (scores[0], scores[1])


def save_model(
    out_dir: Path,
    net: PatchworkNet,
    trainer: Trainer,
    config: PatchworkConfig,
    ds: DatasetInfo,
    values: list[int],
    ignore: int | None,
    run: RunState,
    best: float,
    write: bool = True,
) -> dict[str, Any]:
    """The model folder (weights, log, method, ``patchwork.json`` last) when ``write`` (the main
    process under torchrun), and the run's summary."""
    if write:
        write_model(out_dir, net, trainer, config, ds, values, ignore, run)
    log = run.log
    return {
        "out_dir": str(out_dir),
        "rounds": len(log),
        "last_loss": log[-1]["loss"] if log else None,
        "best_val_dice": best if best >= 0 else None,
        "seconds": log[-1]["seconds"] if log else 0.0,
    }


def write_model(
    out_dir: Path,
    net: PatchworkNet,
    trainer: Trainer,
    config: PatchworkConfig,
    ds: DatasetInfo,
    values: list[int],
    ignore: int | None,
    run: RunState,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {v: k for k, v in ds.labels.items()}
    meta = {
        "kind": "patchwork",
        "config": asdict(config),
        "scheme": config.scheme_obj(ds.ndim).to_json(),
        "net": net.config(),
        "label_values": values,
        "label_names": {str(v): names.get(v, str(v)) for v in values},
        "dontcare": ignore,
        "in_channels": len(ds.channel_names),
        "ndim": ds.ndim,
    }
    save_checkpoint(out_dir / WEIGHTS, weights(trainer, run))
    save_json(out_dir / "log.json", run.log)
    write_method(out_dir, "patchwork")  # no sliding window: the scheme's levels tile the image
    save_json(out_dir / CONFIG, meta)  # last: its presence means the model folder is complete
