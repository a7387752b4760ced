"""Stage 1: train ONE expert H_k with teacher forcing (Algorithm 1, the body of its loop over k).

    python -m siren.train run_dir=runs/x expert=0 scale=tiny model.distribution=6-2 train.steps=200

Experts share nothing and are trained as separate jobs (one per process group; the outer
loop of Algorithm 1 is the launcher's job array). The single ``1-12`` model is expert 0 of
K = 1. Loss: Eq. 6 as computed by ``Expert`` (frame-masked CE averaged over the owned layers as
the official code, or summed as Eq. 6 writes it: ``train.loss_reduction``; ``train.loss_layers=n`` keeps
only the expert's first n layers in it, an ablation of the paper's Influence 1).
Optimiser and data follow appendix B: AdamW at 3e-4, 24 clips per GPU; its 6 s crops of the 10 s clips
are ``train.crop_s=6`` (``scale=paper`` trains on the whole 10 s: README, Length). Warmup + cosine decay to
0.1 x lr and clipping at 1.0 are the authors' code's (the paper does not say); warmup-stable-decay
(``train.schedule=wsd``) is the demo scale's.

Preemption (siren.runtime.StopRequest): SIGUSR2 (and SIGTERM outside SLURM) checkpoints at the next step
boundary and the command exits with ``EXIT_PREEMPTED`` (75); inside SLURM a SIGTERM only asks for a checkpoint
and training goes on; a first Ctrl-C checkpoints, then exits 130. Restarting the same command resumes from
``run_dir/expert_<k>/latest`` and reproduces the uninterrupted run. A non-finite loss or
gradient norm stops the run before the optimiser step, so the last checkpoint stays good.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from siren import checkpoint as ckpt
from siren.config import to_dict
from siren.data.sampler import epoch_loader
from siren.data.stage1 import Stage1Data
from siren.demo_weights import mode_words
from siren.errors import ConfigError, NonFiniteError
from siren.io import save_tensors
from siren.lock import hold
from siren.loss_stats import Stats
from siren.model import Expert, ExpertLoss
from siren.model.continuous import ContinuousLM, ContinuousLoss
from siren.run_dir import others_train, warn_other_train_keys, write_run_config
from siren.run_record import check_resumable, run_config, train_digest
from siren.runtime import (
    EXIT_PREEMPTED,
    Dist,
    RunLog,
    any_rank,
    any_ranks,
    autocast,
    code_version,
    derive_seed,
    init_distributed,
    lr_at,
    param_groups,
    read_log,
    resolve_device,
    stop_on_signal,
    warn_other_device,
)
from siren.train_config import (
    PAPER_GEN_FRAMES,
    Stage1Config,
    TrainConfig,
    parse,
)

__all__ = ["EXIT_PREEMPTED", "Stage1Config", "Stage1Data", "TrainConfig", "parse", "read_log", "train", "main"]
log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- the model family

def build_model(cfg: Stage1Config, data: Stage1Data) -> Expert | ContinuousLM:
    if cfg.family == "discrete":
        return Expert(cfg.model, cfg.expert, data.tables)
    return ContinuousLM(dataclasses.replace(cfg.continuous, latent=data.projection.id), data.projection)


def loss_of(model: Expert | ContinuousLM, batch: dict, reduction: str,
            n_layers: int = 0) -> ExpertLoss | ContinuousLoss:
    """The family's loss; the continuous one has no layers to reduce over (its MNTP acts in train mode only)."""
    return model.loss(batch) if isinstance(model, ContinuousLM) else model.loss(batch, reduction, n_layers)


# ---------------------------------------------------------------------------- one step

def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class LossOf(torch.nn.Module):
    """``forward(batch) = model.loss(batch)``: DDP synchronises gradients only through forward."""

    def __init__(self, model: Expert | ContinuousLM, reduction: str = "mean", n_layers: int = 0):
        super().__init__()
        self.model, self.reduction, self.n_layers = model, reduction, n_layers

    def forward(self, batch: dict) -> ExpertLoss | ContinuousLoss:
        return loss_of(self.model, batch, self.reduction, self.n_layers)


def train_step(net: torch.nn.Module, opt: torch.optim.Optimizer, micro_batches: list[dict], tc: TrainConfig,
               device: torch.device, stats: Stats, ranks: Dist = Dist(), where: str = "") -> torch.Tensor:
    """One optimiser step over grad_accum micro-batches (gradients synchronised across DDP processes
    on the last one only); returns the gradient norm before clipping. A non-finite loss or gradient
    norm on any process raises before ``opt.step``: the weights keep their last finite values."""
    ddp = isinstance(net, torch.nn.parallel.DistributedDataParallel)
    losses = []
    for i, batch in enumerate(micro_batches):
        sync = not ddp or i == len(micro_batches) - 1
        with (contextlib.nullcontext() if sync else net.no_sync()), autocast(tc.precision, device):
            out = net(_to_device(batch, device))
        (out.loss / len(micro_batches)).backward()
        losses.append(out.loss.detach())
        stats.add(out, 1.0)
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip or float("inf"))
    loss = torch.stack(losses).float().mean()
    if any_rank(not (torch.isfinite(loss) and torch.isfinite(grad_norm)), ranks, device):
        opt.zero_grad(set_to_none=True)
        raise NonFiniteError(f"{where}non-finite loss ({float(loss):.4g}) or gradient norm ({float(grad_norm):.4g}); "
                             f"stopped before the optimiser step, nothing saved. Lower train.lr, check the data, or "
                             f"resume from the last checkpoint with train.precision=fp32")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm


VAL_STREAM = -1  # derive_seed's counter for validation: no rank's, so hashed apart from every training stream


@torch.no_grad()
def evaluate(model: Expert | ContinuousLM, data: Stage1Data, cfg: TrainConfig, device: torch.device,
             ranks: Dist) -> dict[str, float]:
    """Loss and per-layer CE/accuracy on the test split, weighted by real frames (so batch size does not matter).

    The continuous family's loss draws diffusion noise and timesteps: from a stream of its own, the same at
    every validation, so training draws what it would without one (``val_every`` is a resumable change)."""
    loader = epoch_loader(data.val, data.collate, cfg.batch_size, shuffle=False, rank=ranks.rank, world=ranks.world,
                          num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    stats = Stats()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed(cfg.seed, VAL_STREAM, ranks.rank))
        for i, batch in enumerate(loader):
            if cfg.val_batches and i >= cfg.val_batches:
                break
            with autocast(cfg.precision, device):
                out = loss_of(model, _to_device(batch, device), cfg.loss_reduction, cfg.loss_layers)
            stats.add(out, out.frames)
    model.train(was_training)
    if not stats.sums:  # this rank got no batch (tiny split, many ranks): zeros under the keys the others reduce,
        # on the device they reduce on (a short list on the CPU aborted the all-reduce: gloo, and NCCL refuses it)
        layers = model.layers if isinstance(model, Expert) else ()
        keys = ["loss", *(f"{m}/L{j + 1}" for j in layers for m in ("ce", "acc")), "_w", "_frames"]
        stats.sums = {k: torch.zeros((), device=device) for k in keys}
    return stats.reduce(ranks)


# ---------------------------------------------------------------------------- checkpoints

@dataclass
class TrainResult:
    status: str  # "finished" | "preempted"
    step: int
    checkpoint: Path | None


def resume(last: ckpt.Checkpoint, model: Expert | ContinuousLM, opt: torch.optim.Optimizer, ranks: Dist,
           device: torch.device, seed: int) -> tuple[dict, Stats]:
    """Weights, optimizer, RNG and the log's running sums from ``last`` (refused when its weights are not
    finite); returns the step / data position to continue from, and those sums."""
    weights = last.model_state()
    ckpt.check_finite_checkpoint(last, weights)
    ckpt.load_weights(model, weights, last.path / "model.safetensors")
    del weights  # the model holds a copy; this drops the file's mapping
    trainer = last.trainer_state(device)
    ckpt.load_optimizer(opt, trainer, last.state["optimizer"]["param_groups"], last.path)
    ckpt.restore_rng(trainer, ranks, device, reseed=derive_seed(seed, ranks.rank, last.step))
    position = {key: int(last.state[key]) for key in ("step", "epoch", "examples_in_epoch")}
    return position, Stats.resumed(trainer, ranks, device)


# ---------------------------------------------------------------------------- the loop

def optimizer(model: torch.nn.Module, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # The fused kernel on CPU too: a tiny expert's ~70 parameter tensors take 1 ms per step instead of 8
    # in the per-tensor loop (~15% of a demo expert's step).
    return torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                             fused=device.type in ("cuda", "cpu"))


def train(cfg: Stage1Config, data: Stage1Data | None = None, handle_signals: bool = True) -> TrainResult:
    """Train expert ``cfg.expert`` until ``cfg.train.steps`` or a stop signal; resume from its latest checkpoint."""
    tc = cfg.train
    if (Path(cfg.run_dir) / "alignment.json").exists():  # its checkpoints are stage 2's: resumed as stage 1's, a mix
        raise ConfigError(f"{cfg.run_dir} is a stage-2 run (alignment.json); train stage 1 in a run_dir of its own "
                          f"(stage 2 starts from it: python -m siren.rl run_dir=<stage-1 run> out=<another folder>)")
    ranks = init_distributed()
    device = resolve_device(tc.device, ranks.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # train.expert_seed=offset: the authors' seed + the expert's first layer, for everything this job draws
    first = cfg.expert * cfg.model.layers_per_expert if cfg.family == "discrete" else 0
    seed = tc.seed + (first if tc.expert_seed == "offset" else 0)
    data = data or Stage1Data.from_prepared(cfg.data_dir, tc.crop_s or None, seed, cfg.codec, tc.crop_min_clap,
                                            latent_dim=cfg.continuous.token_dim if cfg.family == "continuous" else 0)
    if cfg.family == "discrete" and cfg.model.codec and cfg.model.codec != data.codec["id"]:
        raise ConfigError(f"model.codec={cfg.model.codec} but the data and code tables come from codec "
                          f"{data.codec['id']}")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, codec=data.codec["id"]))
    # a second copy (the same job submitted twice, or another seed into the same run) would overwrite
    # init.safetensors (Figure 7's task vectors), append to this log and race this expert's saves: refused before
    # it writes or reads anything of the expert's
    owner = hold(ckpt.expert_dir(cfg.run_dir, cfg.expert) / "train.lock", f"training of expert {cfg.expert}",
                 "wait for it to finish") if ranks.main else contextlib.nullcontext()
    with owner:
        return _train(cfg, data, ranks, device, seed, handle_signals)


def _train(cfg: Stage1Config, data: Stage1Data, ranks: Dist, device: torch.device, seed: int,
           handle_signals: bool) -> TrainResult:
    """``train`` with the expert's lock held."""
    tc, run_dir, k = cfg.train, Path(cfg.run_dir), cfg.expert
    edir = ckpt.expert_dir(run_dir, k)
    n_train = len(data.train)
    global_batch = tc.batch_size * ranks.world
    if n_train < global_batch:
        raise ConfigError(f"the train split has {n_train} examples, fewer than one batch "
                          f"(train.batch_size={tc.batch_size} x {ranks.world} processes)")

    torch.manual_seed(derive_seed(seed, ranks.rank))  # own stream per rank; DDP broadcasts rank 0's init
    model = build_model(cfg, data).to(device)
    opt = optimizer(model, tc, device)
    state, stats = {"step": 0, "epoch": 0, "examples_in_epoch": 0}, Stats()
    last = ckpt.load_latest(edir)
    if last is not None:
        check_resumable(last, cfg, data, ranks.world)
    if ranks.main:  # after the expert's own checkpoint check: its error is the more specific one
        write_run_config(run_dir, run_config(cfg, data))
        if last is None:  # the initialisation (with expert_seed=shared, every expert's): Figure 7's task vectors
            save_tensors(edir / "init.safetensors", model.state_dict())
            warn_other_train_keys(run_dir, {**others_train(run_dir, k), k: to_dict(tc)}, "are trained")
    if last is not None and last.step >= tc.steps:
        return TrainResult("finished", last.step, last.path)  # a re-submitted finished job: nothing to do
    if last is not None:
        state, stats = resume(last, model, opt, ranks, device, seed)
        if ranks.main:
            log.info("expert %d: resuming from %s (step %d)", k, last.path, last.step)
            warn_other_device(last.state.get("device_type"), device, f"expert {k}")
    start = state["step"]
    if ranks.main:  # what the log of a run says it was made with (its config.json says so too)
        modes = {w: (getattr(data, w) or {}).get("weights", "weights not recorded") for w in ("codec", "text")}
        log.info("expert %d: codec: %s; text: %s; code %s", k, *(mode_words(v, w) for w, v in modes.items()),
                 code_version())
    trained = getattr(data.train, "max_frames", None)  # the longest sequence this expert sees
    crop = getattr(data.train, "crop", None)
    if ranks.main and crop and trained is not None and crop > trained:
        log.warning("train.crop_s=%g (%d frames) is longer than every item of the split (at most %d frames): each "
                    "batch is padded to %d frames, %d of them masked in every row", tc.crop_s, crop, trained, crop,
                    crop - trained)
    if ranks.main and trained is not None and trained < PAPER_GEN_FRAMES:
        # a warning where the items hold 10 s but the crop trains fewer positions (a choice: appendix B's 6 s);
        # shorter items leave nothing to choose, and generation warns if it runs past them (every demo expert's
        # log warned, its 2 s items cut to 1 s, though the demo generates 1 s)
        cut = crop is not None and getattr(data.train, "longest", 0) >= PAPER_GEN_FRAMES
        log.log(logging.WARNING if cut else logging.INFO, "expert %d trains on sequences of at most %d frames "
                "(%.1f s); generating the paper's 10 s (%d frames) would run past the trained positions (README: "
                "Length)", k, trained, trained / 50, PAPER_GEN_FRAMES)
    if tc.warmup_steps > tc.steps and ranks.main:
        log.warning("train.warmup_steps=%d > train.steps=%d: the warmup is cut to %d steps (as the authors' code), "
                    "so the run reaches train.lr only at its last step", tc.warmup_steps, tc.steps, tc.steps)

    net = LossOf(model, tc.loss_reduction, tc.loss_layers)
    if ranks.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    loader = epoch_loader(data.train, data.collate, tc.batch_size, seed=seed, rank=ranks.rank, world=ranks.world,
                          drop_last=True, num_workers=tc.num_workers, pin_memory=device.type == "cuda")
    loader.batch_sampler.set_epoch(state["epoch"], state["examples_in_epoch"])

    def batches() -> Iterator[dict]:
        while True:
            for batch in loader:  # each pass is the next epoch (EpochBatches)
                state["examples_in_epoch"] += global_batch
                yield batch
            state["epoch"], state["examples_in_epoch"] = state["epoch"] + 1, 0

    def save(step: int) -> Path | None:
        tensors, groups = ckpt.optimizer_tensors(opt)
        tensors.update(ckpt.rng_tensors(ranks, device))
        tensors.update(stats.saved(ranks, device))
        if not ranks.main:
            return None
        meta = {**state, "expert": k, **run_config(cfg, data), "train": to_dict(tc), "trained_frames": trained,
                "optimizer": {"param_groups": groups}, "world_size": ranks.world,
                "data": {"train": train_digest(data)},
                "finished": step >= tc.steps, "torch": torch.__version__, "device_type": device.type}
        return ckpt.save(edir, step, model.state_dict(), tensors, meta, tc.keep_last)

    from tqdm import tqdm

    stream = batches()
    last_ckpt, result = None, None
    t0, paused = time.perf_counter(), 0.0  # tokens/s counts training time only (not validation, checkpoints)
    with stop_on_signal(handle_signals) as stop, RunLog(edir, start, ranks.main) as runlog, \
            tqdm(total=tc.steps, initial=start, desc=f"expert {k}", disable=not ranks.main, dynamic_ncols=True) as bar:
        model.train()
        for step in range(start, tc.steps):
            lr = lr_at(step, tc)
            for g in opt.param_groups:
                g["lr"] = lr
            grad_norm = train_step(net, opt, [next(stream) for _ in range(tc.grad_accum)], tc, device, stats, ranks,
                                   where=f"expert {k}, step {step + 1}: ")
            state["step"] = done = step + 1
            bar.update(1)

            if done % tc.log_every == 0 or done == tc.steps:
                means = stats.reduce(ranks)
                dt = time.perf_counter() - t0 - paused
                entry = {"step": done, "lr": lr, **{k_: v for k_, v in means.items() if k_ != "_frames"},
                         "grad_norm": float(grad_norm), "tokens/s": means["_frames"] / dt}
                runlog.write(entry)
                bar.set_postfix(loss=f"{entry['loss']:.3f}")
                stats, t0, paused = Stats(), time.perf_counter(), 0.0
            t1 = time.perf_counter()
            if data.val is not None and ((tc.val_every and done % tc.val_every == 0) or done == tc.steps):
                means = evaluate(model, data, tc, device, ranks)
                runlog.write({"step": done, "val": True, **{k_: v for k_, v in means.items() if k_ != "_frames"},
                              "frames": means["_frames"]})
            stop.preempted, save_now = any_ranks([stop.signum is not None, stop.save_due()], ranks, device)
            if stop.preempted or save_now or done % tc.ckpt_every == 0 or done == tc.steps:
                last_ckpt = save(done) or last_ckpt
            paused += time.perf_counter() - t1
            if stop.preempted and done < tc.steps:  # a signal in the last step: finished, not to be requeued
                result = TrainResult("preempted", done, last_ckpt)
                break
        else:
            result = TrainResult("finished", tc.steps, last_ckpt)
    return result


def main(argv: list[str] | None = None, data: Stage1Data | None = None) -> int:
    """CLI entry: 0 when the expert is trained, EXIT_PREEMPTED when a signal stopped it (checkpoint written)."""
    from siren import cli

    cfg = parse(cli.start(argv))
    result = train(cfg, data)
    if dist.is_initialized():
        dist.destroy_process_group()
    if result.status == "preempted":
        log.info("stopped by signal at step %d; checkpoint %s; exit %d (requeue)", result.step, result.checkpoint,
                 EXIT_PREEMPTED)
        return EXIT_PREEMPTED
    log.info("expert %d finished at step %d: %s", cfg.expert, result.step, result.checkpoint)
    return 0


if __name__ == "__main__":
    from siren.cli import run
    from siren.train_config import preset_groups

    run(main, Stage1Config, __doc__, presets=preset_groups())
