"""One training step of a patchwork: the loss over its levels and each patch's scores for hard
mining; under torchrun through DistributedDataParallel on this process's share of the batch, the
loss computed from statistics summed over the processes (see :mod:`flexpatch.patchwork.train`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from flexpatch.distributed import Dist
from flexpatch.patchwork.config import PatchworkConfig
from flexpatch.patchwork.losses import LabelEmbedding, f1_per_sample, patch_loss
from flexpatch.patchwork.mining import INDEX_KEY
from flexpatch.patchwork.model import PatchworkNet
from flexpatch.patchwork.rounds import IGNORE
from flexpatch.runtime import generator
from flexpatch.train.step import Divergence, guarded_step


def targets(label: torch.Tensor, num_labels: int, categorical: bool) -> torch.Tensor:
    """Categorical: the index map as is; multi-label: one channel per label, -1 where don't care."""
    if categorical:
        return label
    onehot = torch.stack([(label == i).float() for i in range(1, num_labels + 1)], dim=1)
    return torch.where((label == IGNORE)[:, None], torch.full_like(onehot, IGNORE), onehot)


class Trainer:
    """Loss over a patchwork's levels, per-sample scores for hard mining; under torchrun the steps run
    through DistributedDataParallel on this process's share of each batch."""

    def __init__(
        self,
        net: PatchworkNet,
        config: PatchworkConfig,
        num_labels: int,
        device: torch.device,
        where: str = "patchwork training",  # what a divergence error names: the model folder
        dist: Dist = Dist(),
    ):
        self.net, self.config, self.num_labels, self.device = net, config, num_labels, device
        self.where, self.steps, self.divergence, self.dist = where, 0, Divergence(), dist
        self.embedding = (
            LabelEmbedding(num_labels + 1, config.embedding_dim, seed=config.seed).to(device)
            if config.embedding_dim
            else None
        )
        params = list(net.parameters()) + (list(self.embedding.parameters()) if self.embedding else [])
        self.opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.gen = generator(config.seed)
        self.model = dist.wrap(_Trained(net, self.embedding), device) if dist.active else net

    def level_loss(
        self, logits: torch.Tensor, label: torch.Tensor, total: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = logits[:, : self.net.num_outputs]
        if self.embedding is not None:
            loss = self.embedding.sampled_loss(out, label, self.config.num_sampled, self.gen, total)
            return loss, loss.detach().expand(len(out))
        target = targets(label, self.num_labels, self.config.categorical)
        return patch_loss(
            out, target, self.config.categorical, batch_dice=self.config.batch_dice, total=total
        )

    def share(self, n: int) -> tuple[slice, float]:
        """This process's samples of a batch of ``n`` and their weight in the loss: its contiguous
        share; in a last batch smaller than the processes, one sample for each of the first ``n``
        and, for the others, the first sample at weight 0 (an empty batch cannot pass the instance
        norms, and DistributedDataParallel waits for every process's gradients)."""
        if n >= self.dist.world:
            mine = self.dist.samples(n)
            return slice(mine.start, mine.stop), 1.0
        return (slice(self.dist.rank, self.dist.rank + 1), 1.0) if self.dist.rank < n else (slice(0, 1), 0.0)

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimiser step on ``batch`` (this process's share of it); returns the whole batch's loss
        and the pool index, loss and F1 of each sample this process trained on."""
        part, weight = self.share(len(batch[INDEX_KEY]))
        batch = {k: v[part] for k, v in batch.items()}
        depth = self.net.depth
        crops = [batch[f"x{k}"].to(self.device) for k in range(depth)]
        rels = [None] + [batch[f"rel{k}"].to(self.device) for k in range(1, depth)]
        levels = range(depth) if self.config.intermediate_loss else [depth - 1]
        total = torch.zeros((), device=self.device)
        summed = lambda stats: self.dist.sum(stats * weight)  # noqa: E731 - the batch's sums
        # bfloat16 autocast on CUDA, as the sliding-window trainer; the losses cast logits to float32
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            outs = self.model(crops, rels)
            for k in levels:
                loss, per_sample = self.level_loss(outs[k], batch[f"y{k}"].to(self.device), summed)
                total = total + loss
        self.steps += 1
        stepped = guarded_step(total, self.opt, self.net.parameters(), 12.0)
        self.divergence.update(stepped, self.steps, self.where)
        final = outs[-1][:, : self.net.num_outputs].detach()
        if self.embedding is not None:
            final = self.embedding.logits(final)
        label = batch[f"y{depth - 1}"].to(self.device)
        f1 = f1_per_sample(
            final, targets(label, self.num_labels, self.config.categorical), self.config.categorical
        )
        kept = slice(None) if weight else slice(0, 0)  # a stand-in sample has no score of this process
        scores = per_sample.detach().cpu()[kept], f1.detach().cpu()[kept]
        return float(total.detach()), batch[INDEX_KEY][kept], *scores


class _Trained(torch.nn.Module):
    """The network and the label embedding as one module, so that DistributedDataParallel averages
    the embedding's gradients too (it is used by the loss, after the network's forward)."""

    def __init__(self, net: PatchworkNet, embedding: LabelEmbedding | None) -> None:
        super().__init__()
        self.net, self.embedding = net, embedding

    def forward(self, crops: list[torch.Tensor], rels: list[torch.Tensor | None]) -> list[torch.Tensor]:
        return self.net(crops, rels)
