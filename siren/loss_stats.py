"""Running loss statistics of stage-1 training and validation: weighted sums over batches, totalled over processes.

An expert's are its loss and per-layer CE/accuracy (paper numbering, RVQ layers 1..12); the continuous family's its
loss alone. The sums travel in checkpoints (``saved`` / ``resumed``), so a resumed run's first log entry averages
the same steps as an uninterrupted run's.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from siren.model import ExpertLoss
from siren.model.continuous import ContinuousLoss
from siren.runtime import Dist


class Stats:
    """Weighted sums of the model's loss (an expert's also per-layer CE/accuracy) over some batches: training
    weighs each batch 1, so its log is the mean of the losses the optimiser saw (each a mean over its batch's
    real frames); validation weighs each by its frames, so the batch size does not matter."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, out: ExpertLoss | ContinuousLoss, weight: float) -> None:
        vals = {"loss": out.loss.detach()}
        for i, j in enumerate(getattr(out, "layers", ())):  # a continuous model's loss has no layers
            vals[f"ce/L{j + 1}"] = out.ce[i]  # paper numbering: RVQ layers 1..12
            vals[f"acc/L{j + 1}"] = out.acc[i]
        for k, v in vals.items():
            self.sums[k] = self.sums.get(k, 0) + v.float() * weight
        self.sums["_w"] = self.sums.get("_w", 0) + weight
        self.sums["_frames"] = self.sums.get("_frames", 0) + out.frames

    def saved(self, ranks: Dist, device: torch.device) -> dict[str, torch.Tensor]:
        """The sums since the last log entry, totalled over processes, for a checkpoint: the resumed run's first
        entry then averages the same steps as an uninterrupted run's. Frames are left out: tokens/s counts the
        time since the resume."""
        keys = sorted(k for k in self.sums if k != "_frames")  # the same on every rank: each adds as many batches
        if not keys:
            return {}
        vec = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float64).to(device) for k in keys])
        if ranks.world > 1:
            dist.all_reduce(vec)
        return {f"stats.{k}": v for k, v in zip(keys, vec.cpu())}

    @classmethod
    def resumed(cls, tensors: dict[str, torch.Tensor], ranks: Dist, device: torch.device) -> Stats:
        """A checkpoint's totals, on rank 0 alone (the next log entry sums over ranks)."""
        stats = cls()
        if ranks.main:
            for name, v in tensors.items():
                if name.startswith("stats."):  # float32 sums as they were kept (exact through float64)
                    k = name.removeprefix("stats.")
                    stats.sums[k] = v.item() if k == "_w" else v.to(device, torch.float32)
        return stats

    def reduce(self, ranks: Dist) -> dict[str, float]:
        """Weighted means across batches and processes; '_frames' stays a total."""
        keys = sorted(self.sums)
        device = next((v.device for v in self.sums.values() if torch.is_tensor(v)), torch.device("cpu"))
        vec = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float64, device=device) for k in keys])
        if ranks.world > 1:
            dist.all_reduce(vec)
        tot = dict(zip(keys, vec.tolist()))
        w = tot.pop("_w")
        frames = tot.pop("_frames")
        return {**({k: v / w for k, v in tot.items()} if w else {}), "_frames": frames}  # w = 0: no batch anywhere
