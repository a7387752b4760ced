"""Stage 1: train ONE expert H_k with teacher forcing (Algorithm 1, the body of its loop over k).

    python -m siren.train run_dir=runs/x expert=0 scale=tiny model.distribution=6-2 train.steps=200

Experts share nothing and are trained as separate jobs (one per process group; the outer
loop of Algorithm 1 is the launcher's job array). The single ``1-12`` model is expert 0 of
K = 1. Loss: Eq. 6 as computed by ``Expert`` (frame-masked CE summed over owned layers).
Optimiser and data follow appendix B: AdamW at 3e-4, 24 clips per GPU, random 6 s crops of
the 10 s clips; warmup + cosine decay and clipping are ours (the paper does not say).

Preemption: SIGUSR2 / SIGTERM (what SLURM sends before a time limit or preemption) set a
flag; the loop writes a checkpoint at the next step boundary and ``main`` exits with
``EXIT_PREEMPTED`` (75, EX_TEMPFAIL) so the launcher requeues. Restarting the same command
resumes from ``run_dir/expert_<k>/latest`` and reproduces the uninterrupted run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from siren import checkpoint as ckpt
from siren.codec import CodecConfig, CodeTables
from siren.config import ConfigError, load_config, to_dict
from siren.io import save_tensors
from siren.model import Expert, ExpertLoss
from siren.model.config import ModelConfig, presets

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: "try again later" -> the launcher requeues

# Train-config keys that may change when a run resumes (bookkeeping only: they cannot
# change the loss curve). Every other difference is an error.
RESUMABLE_CHANGES = ("log_every", "val_every", "val_batches", "ckpt_every", "keep_last", "num_workers", "device")


@dataclass
class TrainConfig:
    steps: int = 150_000  # paper: 150K steps (1.6B), 500K (3.1B)
    batch_size: int = 24  # clips per process and micro-batch (paper: 24 per L20 GPU)
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 3e-4  # appendix B
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1  # on matrices only (see param_groups)
    warmup_steps: int = 2000  # linear warmup, then cosine decay to min_lr at `steps`
    min_lr: float = 3e-5
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    seed: int = 0
    log_every: int = 50
    val_every: int = 2000  # 0 = only at the end
    val_batches: int = 0  # batches of the test split per validation; 0 = all
    ckpt_every: int = 1000
    keep_last: int = 3  # checkpoints kept per expert
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    crop_s: float = 6.0  # random crops of this length (appendix B); 0 = whole clips
    crop_min_clap: float = 0.0  # > 0: crops only where CLAP similarity > this (appendix B: 0.2; prepare crop_s=)
    num_workers: int = 2

    def __post_init__(self):
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.precision must be auto, bf16 or fp32, got '{self.precision}'")
        for key in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class Stage1Config:
    run_dir: str = "runs/siren"  # holds the K experts of one model
    expert: int = 0  # k (0-based): which expert this process trains
    data_dir: str = "data/prepared"  # output of siren.data.prepare
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)  # supplies the frozen code tables


def parse(args: list[str]) -> Stage1Config:
    cfg = load_config(Stage1Config, args, presets=presets("model."))
    if not 0 <= cfg.expert < cfg.model.n_experts:
        raise ConfigError(f"expert={cfg.expert} does not exist in model.distribution={cfg.model.distribution} "
                          f"(experts 0..{cfg.model.n_experts - 1})")
    return cfg


# ---------------------------------------------------------------------------- optimisation

NO_DECAY = ("bias", "sos", "pos")  # biases (the code embeddings' [12, d] too), sos vectors, learned positions


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices only; none on norms, biases, sos, positions."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        (decay if p.ndim >= 2 and leaf not in NO_DECAY else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warmup to lr, cosine to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------- data order

class EpochBatches(Sampler[list[tuple[int, int]]]):
    """Batches of one epoch as dataset keys (epoch, index): a permutation seeded by (seed, epoch),
    cut into global batches of ``batch_size * world`` (rank r takes its slice of each), the first
    ``skip`` examples left out. The dataset draws an item's random crop from (seed, epoch, index).

    A resumed job rebuilds the epoch from (seed, epoch) and skips what was consumed, so it
    sees exactly the batches (and crops) the uninterrupted job would have seen. Unlike
    siren.data's loader order, this one is split across DDP processes."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                 rank: int = 0, world: int = 1, skip: int = 0, drop_last: bool = True):
        self.n, self.batch_size, self.rank, self.world, self.skip = n, batch_size, rank, world, skip
        self.epoch = epoch
        self.drop_last = drop_last
        if shuffle:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            self.order = torch.randperm(n, generator=g).tolist()
        else:
            self.order = list(range(n))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.batch_size * self.world
        for start in range(self.skip, self.n, step):
            if self.drop_last and start + step > self.n:
                return
            part = self.order[start: start + step][self.rank * self.batch_size: (self.rank + 1) * self.batch_size]
            if part:
                yield [(self.epoch, i) for i in part]

    def __len__(self) -> int:
        step = self.batch_size * self.world
        return (self.n - self.skip) // step if self.drop_last else math.ceil((self.n - self.skip) / step)


def _loader(source: DataLoader, sampler: EpochBatches, num_workers: int) -> DataLoader:
    """``source``'s dataset and collate function read in ``sampler``'s order.

    The DataLoader gets its own generator so iterating never draws from the global torch RNG
    (which the model's dropout uses): a resumed run stays on the uninterrupted run's stream."""
    return DataLoader(source.dataset, batch_sampler=sampler, collate_fn=source.collate_fn, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(0),
                      persistent_workers=False)


@dataclass
class Stage1Data:
    """What a stage-1 job reads: train/test loaders (map-style datasets indexed by (epoch, index)),
    the codec's frozen code tables for the embeddings, and the provenance of the codec and text
    encoder the data was made with ({"id": ..., "weights": "pretrained" | "random"})."""
    train: DataLoader
    val: DataLoader | None
    tables: CodeTables
    codec: dict
    text: dict

    @classmethod
    def from_prepared(cls, cfg: Stage1Config) -> "Stage1Data":
        from siren.codec import Codec
        from siren.data import DataError, make_loader

        crop = cfg.train.crop_s or None
        train = make_loader(cfg.data_dir, split="train", batch_size=cfg.train.batch_size, crop_s=crop, shuffle=True,
                            seed=cfg.train.seed, crop_min_clap=cfg.train.crop_min_clap)
        try:
            val = make_loader(cfg.data_dir, split="test", batch_size=cfg.train.batch_size, crop_s=crop, shuffle=False,
                              seed=cfg.train.seed)
        except DataError as e:
            print(f"[siren.train] warning: no validation: {e}", file=sys.stderr)
            val = None
        info = train.dataset.info
        codec = Codec(cfg.codec)
        if info["codec"]["id"] != codec.id:
            raise ConfigError(f"{cfg.data_dir} was prepared with codec {info['codec']['id']}, this config builds "
                              f"{codec.id} (codec.weights={cfg.codec.weights}); set codec.weights to the prepared "
                              f"one or prepare again")
        return cls(train, val, codec.code_tables(), {"id": codec.id, "weights": codec.weights_label},
                   {"id": info["text"]["id"], "weights": info["text"]["weights"]})


# ---------------------------------------------------------------------------- processes, devices, signals

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """torchrun (RANK/WORLD_SIZE env) or a multi-task submitit job -> process group; else one process."""
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if int(os.environ.get("WORLD_SIZE", 1)) == 1 and os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        if submitit.JobEnvironment().num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return Dist()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def pick_device(cfg: TrainConfig, ranks: Dist) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{ranks.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{ranks.local_rank}")
    return device


def autocast(cfg: TrainConfig, device: torch.device):
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


class StopRequest:
    """SIGUSR2/SIGTERM handler: remembers the signal; the loop checkpoints at the next step boundary.

    A handler installed before ours (submitit's requeue handler) is called after the
    checkpoint is safely written, so submitit still requeues a job it launched. Inside a SLURM
    job only SIGUSR2 stops the loop: preemption and `scancel --signal` deliver SIGTERM just before
    SIGUSR2, and stopping on the SIGTERM would exit before submitit requeues (a cluster that
    preempts with SIGTERM then SIGKILL resumes from the last periodic checkpoint)."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}
        self.signals = (signal.SIGUSR2,) if "SLURM_JOB_ID" in os.environ else (signal.SIGUSR2, signal.SIGTERM)

    def __call__(self, signum, frame) -> None:
        self.signum = signum

    def install(self) -> None:
        for s in self.signals:
            self.previous[s] = signal.signal(s, self)

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous.clear()

    def chain(self) -> None:
        """Run the pre-existing handler of the caught signal (after our checkpoint)."""
        prev = self.previous.get(self.signum)
        self.restore()
        if callable(prev):
            prev(self.signum, None)


# ---------------------------------------------------------------------------- logging

class RunLog:
    """JSONL (one object per logged step) + TensorBoard scalars, main process only.

    On resume the entries after the checkpoint's step are dropped (they are recomputed), so
    log.jsonl always reads as one uninterrupted run."""

    def __init__(self, edir: Path, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = edir / "log.jsonl"
        self.tb = None
        if not enabled:
            return
        from siren import io

        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _json_step(line) <= start_step]
            io.write_text(self.path, "".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(edir / "tb"), purge_step=start_step + 1)

    def write(self, entry: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        prefix = "val/" if entry.get("val") else "train/"
        for k, v in entry.items():
            if k not in ("step", "val") and isinstance(v, (int, float)):
                self.tb.add_scalar(prefix + k, v, entry["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _json_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # an unreadable (half-written) line is dropped


def read_log(edir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(edir) / "log.jsonl").read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------- one expert

def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Stats:
    """Sums of the expert's loss, per-layer CE/accuracy, frame-weighted, over some batches."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, out: ExpertLoss, weight: float) -> None:
        vals = {"loss": out.loss.detach()}
        for i, j in enumerate(out.layers):
            vals[f"ce/L{j + 1}"] = out.ce[i]  # paper numbering: RVQ layers 1..12
            vals[f"acc/L{j + 1}"] = out.acc[i]
        for k, v in vals.items():
            self.sums[k] = self.sums.get(k, 0) + v.float() * weight
        self.sums["_w"] = self.sums.get("_w", 0) + weight
        self.sums["_frames"] = self.sums.get("_frames", 0) + out.frames

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
        return {**{k: v / w for k, v in tot.items()}, "_frames": frames}


class LossOf(torch.nn.Module):
    """``forward(batch) = expert.loss(batch)``: DDP synchronises gradients only through forward."""

    def __init__(self, expert: Expert):
        super().__init__()
        self.expert = expert

    def forward(self, batch: dict) -> ExpertLoss:
        return self.expert.loss(batch)


def train_step(net: torch.nn.Module, opt: torch.optim.Optimizer, micro_batches: list[dict], tc: TrainConfig,
               device: torch.device, stats: Stats) -> torch.Tensor:
    """One optimiser step over grad_accum micro-batches (gradients synchronised across DDP processes
    on the last one only); returns the gradient norm before clipping."""
    ddp = isinstance(net, torch.nn.parallel.DistributedDataParallel)
    for i, batch in enumerate(micro_batches):
        sync = not ddp or i == len(micro_batches) - 1
        with (contextlib.nullcontext() if sync else net.no_sync()), autocast(tc, device):
            out = net(_to_device(batch, device))
        (out.loss / len(micro_batches)).backward()
        stats.add(out, 1.0)
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip or float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm


@torch.no_grad()
def evaluate(model: Expert, loader: DataLoader, cfg: TrainConfig, device: torch.device,
             ranks: Dist) -> dict[str, float]:
    """Loss and per-layer CE/accuracy on the test split, weighted by real frames (so batch size does not matter)."""
    n = len(loader.dataset)
    sampler = EpochBatches(n, cfg.batch_size, 0, 0, shuffle=False, rank=ranks.rank, world=ranks.world,
                           drop_last=False)
    was_training = model.training
    model.eval()
    stats = Stats()
    for i, batch in enumerate(_loader(loader, sampler, cfg.num_workers)):
        if cfg.val_batches and i >= cfg.val_batches:
            break
        with autocast(cfg, device):
            out = model.loss(_to_device(batch, device))
        stats.add(out, out.frames)
    model.train(was_training)
    if not stats.sums:  # this rank got no batch (tiny split, many ranks): contribute zeros
        stats.sums = {"_w": 0.0, "_frames": 0.0}
    return stats.reduce(ranks)


@dataclass
class TrainResult:
    status: str  # "finished" | "preempted"
    step: int
    checkpoint: Path | None


def _rng_tensors(ranks: Dist, device: torch.device) -> dict[str, torch.Tensor]:
    """Every rank's torch RNG states (CPU, and this rank's CUDA device), as uint8 tensors on rank 0."""
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    if ranks.world == 1:
        return {f"rng.{k}.rank0": v for k, v in mine.items()}
    out = {}
    for k, v in mine.items():
        parts = [torch.empty_like(v, device=device) for _ in range(ranks.world)]
        dist.all_gather(parts, v.to(device))
        out.update({f"rng.{k}.rank{r}": p.cpu() for r, p in enumerate(parts)})
    return out


def _restore_rng(tensors: dict[str, torch.Tensor], ranks: Dist, device: torch.device, seed: int, step: int) -> None:
    cpu = tensors.get(f"rng.cpu.rank{ranks.rank}")
    if cpu is None or f"rng.cpu.rank{ranks.world}" in tensors:  # saved with another number of processes
        print(f"[siren.train] checkpoint RNG states are for another number of processes; "
              f"reseeding rank {ranks.rank} from (seed, rank, step)", file=sys.stderr)
        torch.manual_seed(seed * 1_000_003 + ranks.rank * 7919 + step)
        return
    torch.set_rng_state(cpu)
    if device.type == "cuda" and f"rng.cuda.rank{ranks.rank}" in tensors:
        torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{ranks.rank}"], device)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW state -> tensors ('optim.<param index>.<name>') + JSON-able param groups."""
    sd = opt.state_dict()
    tensors = {f"optim.{i}.{name}": t for i, st in sd["state"].items() for name, t in st.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict],
                    where: Path) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = t
    sizes = [len(g["params"]) for g in opt.param_groups]
    if [len(g["params"]) for g in groups] != sizes:
        raise ckpt.CheckpointError(f"{where}/trainer.safetensors holds optimizer state for parameter groups of sizes "
                                   f"{[len(g['params']) for g in groups]}, this model has {sizes}")
    opt.load_state_dict({"state": state, "param_groups": groups})


def run_config(cfg: Stage1Config, data: Stage1Data) -> dict:
    """What every expert of a run shares: run_dir/config.json."""
    return {"model": to_dict(cfg.model), "codec": data.codec, "text": data.text}


def check_resumable(last: ckpt.Checkpoint, cfg: Stage1Config) -> None:
    """The checkpoint must be of this expert of this model, trained with this train config
    (bookkeeping keys aside); the error names every differing key."""
    where = f"checkpoint {last.path}"
    ckpt.check_config({"model": last.state["model"], "expert": last.state["expert"]},
                      {"model": to_dict(cfg.model), "expert": cfg.expert}, where,
                      fix="Use another run_dir, or set these keys back.")
    ckpt.check_config({"train": last.state["train"]}, {"train": to_dict(cfg.train)}, where,
                      ignore=tuple(f"train.{key}" for key in RESUMABLE_CHANGES),
                      fix="Only bookkeeping keys may change on resume: " + ", ".join(RESUMABLE_CHANGES) + ".")


def resume(last: ckpt.Checkpoint, model: Expert, opt: torch.optim.Optimizer, ranks: Dist, device: torch.device,
           seed: int) -> dict:
    """Weights, optimizer, RNG from ``last``; returns the step / data position to continue from."""
    ckpt.load_weights(model, last.model_state(), last.path / "model.safetensors")
    trainer = last.trainer_state()
    _load_optimizer(opt, trainer, last.state["optimizer"]["param_groups"], last.path)
    _restore_rng(trainer, ranks, device, seed, last.step)
    if ranks.main:
        print(f"[siren.train] resuming expert {last.state['expert']} from {last.path}", file=sys.stderr)
    return {key: int(last.state[key]) for key in ("step", "epoch", "examples_in_epoch")}


def train(cfg: Stage1Config, data: Stage1Data | None = None, handle_signals: bool = True) -> TrainResult:
    """Train expert ``cfg.expert`` until ``cfg.train.steps`` or a stop signal; resume from its latest checkpoint."""
    tc = cfg.train
    ranks = init_distributed()
    device = pick_device(tc, ranks)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    data = data or Stage1Data.from_prepared(cfg)
    if cfg.model.codec and cfg.model.codec != data.codec["id"]:
        raise ConfigError(f"model.codec={cfg.model.codec} but the data and code tables come from codec "
                          f"{data.codec['id']}")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, codec=data.codec["id"]))
    run_dir, k = Path(cfg.run_dir), cfg.expert
    edir = ckpt.expert_dir(run_dir, k)

    n_train = len(data.train.dataset)
    global_batch = tc.batch_size * ranks.world
    if n_train < global_batch:
        raise ConfigError(f"the train split has {n_train} examples, fewer than one batch "
                          f"(train.batch_size={tc.batch_size} x {ranks.world} processes)")

    torch.manual_seed(tc.seed * 1_000_003 + ranks.rank * 7919)  # own stream per rank; DDP broadcasts rank 0's init
    model = Expert(cfg.model, k, data.tables).to(device)
    opt = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                            fused=device.type == "cuda")
    state = {"step": 0, "epoch": 0, "examples_in_epoch": 0}
    last = ckpt.load_latest(edir)
    if last is not None:
        check_resumable(last, cfg)
    if ranks.main:  # after the expert's own checkpoint check: its error is the more specific one
        ckpt.write_run_config(run_dir, run_config(cfg, data))
        if last is None:  # the shared initialisation (same seed for every expert): Figure 7's task vectors
            save_tensors(edir / "init.safetensors", model.state_dict())
    if last is not None and last.step >= tc.steps:
        return TrainResult("finished", last.step, last.path)  # a re-submitted finished job: nothing to do
    if last is not None:
        state = resume(last, model, opt, ranks, device, tc.seed)
        if ranks.main:
            print(f"[siren.train] expert {k}: resuming from {last.path} (step {last.step})", file=sys.stderr)
    start = state["step"]
    if tc.warmup_steps >= tc.steps and ranks.main:
        print(f"[siren.train] warning: train.warmup_steps={tc.warmup_steps} >= train.steps={tc.steps}: the learning "
              f"rate only ramps up (peak {lr_at(tc.steps - 1, tc):.2e})", file=sys.stderr)

    net = LossOf(model)
    if ranks.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    log = RunLog(edir, start, ranks.main)
    stop = StopRequest()
    if handle_signals:
        stop.install()

    def batches() -> Iterator[dict]:
        while True:
            epoch, skip = state["epoch"], state["examples_in_epoch"]
            sampler = EpochBatches(n_train, tc.batch_size, tc.seed, epoch, rank=ranks.rank, world=ranks.world,
                                   skip=skip)
            for batch in _loader(data.train, sampler, tc.num_workers):
                state["examples_in_epoch"] += global_batch
                yield batch
            state["epoch"], state["examples_in_epoch"] = epoch + 1, 0

    def save(step: int) -> Path | None:
        tensors, groups = _optimizer_tensors(opt)
        tensors.update(_rng_tensors(ranks, device))
        if not ranks.main:
            return None
        meta = {**state, "expert": k, **run_config(cfg, data), "train": to_dict(tc), "optimizer": groups,
                "world_size": ranks.world,
                "finished": step >= tc.steps, "torch": torch.__version__}
        return ckpt.save(edir, step, model.state_dict(), tensors, meta, tc.keep_last)

    from tqdm import tqdm

    bar = tqdm(total=tc.steps, initial=start, desc=f"expert {k}", disable=not ranks.main, dynamic_ncols=True)
    stream = batches()
    stats, last_ckpt, result = Stats(), None, None
    t0, paused = time.perf_counter(), 0.0  # tokens/s counts training time only (not validation, checkpoints)
    try:
        model.train()
        for step in range(start, tc.steps):
            lr = lr_at(step, tc)
            for g in opt.param_groups:
                g["lr"] = lr
            grad_norm = train_step(net, opt, [next(stream) for _ in range(tc.grad_accum)], tc, device, stats)
            state["step"] = done = step + 1
            bar.update(1)

            if done % tc.log_every == 0 or done == tc.steps:
                means = stats.reduce(ranks)
                dt = time.perf_counter() - t0 - paused
                entry = {"step": done, "lr": lr, **{k_: v for k_, v in means.items() if k_ != "_frames"},
                         "grad_norm": float(grad_norm), "tokens/s": means["_frames"] / dt}
                log.write(entry)
                bar.set_postfix(loss=f"{entry['loss']:.3f}")
                stats, t0, paused = Stats(), time.perf_counter(), 0.0
            t1 = time.perf_counter()
            if data.val is not None and ((tc.val_every and done % tc.val_every == 0) or done == tc.steps):
                means = evaluate(model, data.val, tc, device, ranks)
                log.write({"step": done, "val": True, **{k_: v for k_, v in means.items() if k_ != "_frames"},
                           "frames": means["_frames"]})
            stopping = _any_rank(stop.signum is not None, ranks, device)
            if stopping or done % tc.ckpt_every == 0 or done == tc.steps:
                last_ckpt = save(done) or last_ckpt
            paused += time.perf_counter() - t1
            if stopping:
                result = TrainResult("preempted", done, last_ckpt)
                break
        else:
            result = TrainResult("finished", tc.steps, last_ckpt)
    finally:
        bar.close()
        log.close()
        if stop.signum is not None and result is not None and result.status == "preempted":
            stop.chain()
        else:
            stop.restore()
    return result


def _any_rank(flag: bool, ranks: Dist, device: torch.device) -> bool:
    """A signal seen by any process stops all of them at the same step."""
    if ranks.world == 1:
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def main(argv: list[str] | None = None, data: Stage1Data | None = None) -> int:
    """CLI entry: 0 when the expert is trained, EXIT_PREEMPTED when a signal stopped it (checkpoint written)."""
    cfg = parse(sys.argv[1:] if argv is None else argv)
    result = train(cfg, data)
    if dist.is_initialized():
        dist.destroy_process_group()
    if result.status == "preempted":
        print(f"[siren.train] stopped by signal at step {result.step}; checkpoint {result.checkpoint}; "
              f"exit {EXIT_PREEMPTED} (requeue)", file=sys.stderr)
        return EXIT_PREEMPTED
    print(f"[siren.train] expert {cfg.expert} finished at step {result.step}: {result.checkpoint}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
