"""Stage 2, anti-causal alignment (section 4.2, Algorithm 3): the training loop and its run directory.

    python -m siren.rl run_dir=runs/siren out=runs/siren-rl prompts=data/rl_prompts.csv \
        align=anti_causal n=1 method=grpo steps=2000 batch=8 group=8

Each step: B prompts (line 2) -> the old policy is the current one (line 3) -> G rollouts per
prompt with all experts (line 4) -> rewards (line 5, Eq. 8) -> group advantages and the
gamma filter (line 6, Eq. 9) -> mu updates of the clipped surrogate (lines 7-9, Eq. 10-11).
No value model. ``method=dpo`` replaces lines 6-9 by DPO on the best/worst rollout of each
group against the frozen stage-1 expert (Figure 5). Which experts learn is ``align``/``n``
(Table 7); every other expert is frozen and stays bit-identical.

The output is a NEW run directory that ``siren.load`` reads like a stage-1 run:

    out/
      config.json          the stage-1 run's config.json (same model, codec, text encoder)
      alignment.json       this config, the source run and its checkpoints, reward/codec/text ids
      expert_<k>/          frozen experts: the stage-1 checkpoint, hard-linked (or copied)
      expert_<k>/          trainable experts: step_<rl step>/ checkpoints (weights, AdamW state),
                           step_00000000 = the stage-1 weights
      rl/state.json        the last step every trainable expert has a checkpoint of (commit point)
      rl/log.jsonl, rl/tb  one entry per step: rewards, filter, clip, ratios, KL, loss

Choices the paper leaves open (stated so they can be changed): eps_d=0.2, eps_u=0.28 (the
DAPO clip-higher values), gamma=0.1, lr=1e-6 constant, AdamW without weight decay, grad
clip 1.0; std in Eq. 9 is the population std; J averages over the KEPT rollouts; the
models run in eval mode (no dropout) and sample at sample.temperature.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from siren import checkpoint as ckpt
from siren import io
from siren.codec import FRAME_RATE, CodecConfig
from siren.config import ConfigError, load_config, to_dict
from siren.model import CollaborativeModel, Expert
from siren.rl import objective as obj
from siren.rl.reward import RewardConfig
from siren.rl.rollout import Rollouts, action_logprobs, collect, trainable_experts
from siren.sample import SampleConfig
from siren.text import TextConfig
from siren.train import EXIT_PREEMPTED, RunLog, StopRequest, param_groups

METHODS = ("grpo", "dpo")
# Keys that may change when a run resumes: they cannot change the numbers of the steps already
# taken (steps extends or shortens the run; the rest is bookkeeping or memory).
RESUMABLE_CHANGES = ("steps", "log_every", "ckpt_every", "keep_last", "device", "micro_batch", "decode_batch",
                     "link")


@dataclass
class AlignConfig:
    run_dir: str = ""  # stage-1 run directory (read only)
    out: str = ""  # the new run directory (stage-1 experts linked + the aligned expert(s))
    prompts: str = ""  # captions: .txt (one per line) or .csv / .jsonl with a 'caption' column
    align: str = "anti_causal"  # anti_causal: train the first n experts | causal: the last n (Table 7)
    n: int = 1  # experts trained (1 = Siren, 2 = Table 7 row 2)
    method: str = "grpo"  # grpo (Eq. 10) | dpo (Figure 5)
    steps: int = 2000  # section 5.1: the first transformer is fine-tuned for 2K more steps
    batch: int = 8  # B prompts per step (Algorithm 3 line 2)
    group: int = 8  # G rollouts per prompt (line 4)
    mu: int = 1  # policy updates per rollout batch (line 7)
    gamma: float = 0.1  # advantage filter |A_i| >= gamma (Eq. 10)
    eps_d: float = 0.2  # lower clip 1 - eps_d (Eq. 10)
    eps_u: float = 0.28  # upper clip 1 + eps_u (Eq. 10)
    beta: float = 0.1  # DPO temperature
    kl_coef: float = 0.0  # coefficient of KL(pi || stage-1) in the GRPO loss; 0 = logged only
    log_kl: bool = True  # compute the KL to the stage-1 policy (needs a frozen copy of the trainable experts)
    lr: float = 1e-6
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm over the trainable experts; 0 = off
    seconds: float = 10.0  # rollout length: the paper's 10 s clips (500 frames at 50 Hz)
    rollout_batch: int = 0  # rollouts sampled together; 0 = all B*G at once
    micro_batch: int = 16  # rollouts per forward/backward of the update; 0 = all at once
    decode_batch: int = 8  # rollouts decoded + scored together
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA) | bf16 | fp32
    log_every: int = 1
    ckpt_every: int = 100
    keep_last: int = 2  # >= 2: a crash between saving two experts must leave a common step
    link: str = "hardlink"  # frozen experts in out/: hardlink (falls back to copy) | copy | symlink
    sample: SampleConfig = field(default_factory=SampleConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    text: TextConfig = field(default_factory=TextConfig)  # the stage-1 run's frozen text encoder

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if self.align not in ("anti_causal", "causal"):
            raise ConfigError(f"align must be anti_causal or causal, got '{self.align}'")
        for key in ("n", "steps", "batch", "mu", "log_every", "ckpt_every", "decode_batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.group < 2:
            raise ConfigError(f"group must be >= 2 (advantages and DPO pairs compare rollouts of one prompt), "
                              f"got {self.group}")
        if self.keep_last < 2:
            raise ConfigError(f"keep_last must be >= 2 (got {self.keep_last}): with several trainable experts a "
                              f"job killed between their checkpoints must leave a step they all have")
        if self.gamma < 0 or self.eps_d <= 0 or self.eps_d >= 1 or self.eps_u <= 0:
            raise ConfigError(f"need gamma >= 0, 0 < eps_d < 1, eps_u > 0; got gamma={self.gamma}, "
                              f"eps_d={self.eps_d}, eps_u={self.eps_u}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision must be auto, bf16 or fp32, got '{self.precision}'")
        if self.link not in ("hardlink", "copy", "symlink"):
            raise ConfigError(f"link must be hardlink, copy or symlink, got '{self.link}'")

    @property
    def n_frames(self) -> int:
        return max(1, round(self.seconds * FRAME_RATE))


# ``reward=NAME`` selects a reward model (reward.name=NAME plus its own keys, e.g. reward.weights).
PRESETS = {"reward": {name: {"reward.name": name} for name in ("clap", "imagebind", "code_match")}}


def parse(args: Sequence[str]) -> AlignConfig:
    cfg = load_config(AlignConfig, args, presets=PRESETS)
    for key in ("run_dir", "out"):
        if not getattr(cfg, key):
            raise ConfigError(f"{key}= is required (python -m siren.rl run_dir=RUN out=NEW_RUN prompts=FILE ...)")
    if Path(cfg.out).resolve() == Path(cfg.run_dir).resolve():
        raise ConfigError(f"out={cfg.out} is the stage-1 run itself: stage 2 writes a new run directory")
    return cfg


# ---------------------------------------------------------------------------- prompts

def read_prompts(path: str | os.PathLike) -> list[str]:
    """Captions from a .txt (one per line), or a .csv / .jsonl with a 'caption' column."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {p} does not exist (prompts= takes a .txt, .csv or .jsonl of captions)")
    if p.suffix == ".csv":
        with open(p, newline="") as f:
            reader = csv.DictReader(f)
            if "caption" not in (reader.fieldnames or []):
                raise ValueError(f"{p}: no 'caption' column (columns: {reader.fieldnames})")
            caps = [row["caption"] for row in reader]
    elif p.suffix == ".jsonl":
        caps = []
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                try:
                    caps.append(json.loads(line)["caption"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{p}:{i}: not a JSON object with a 'caption' ({e})") from None
    else:
        caps = p.read_text().splitlines()
    caps = [c.strip() for c in caps if c and c.strip()]
    if not caps:
        raise ValueError(f"{p} holds no caption")
    return caps


def prompt_batch(prompts: Sequence[str], step: int, batch: int, seed: int) -> list[str]:
    """Captions of step ``step``: an endless stream of seeded permutations (one per epoch),
    cut into batches, so a resumed run draws what the uninterrupted one drew."""
    n, out = len(prompts), []
    for pos in range(step * batch, (step + 1) * batch):
        epoch, i = divmod(pos, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(prompts[int(order[i])])
    return out


# ---------------------------------------------------------------------------- stage-1 run

def load_stage1(run_dir: str | os.PathLike, device: str | torch.device = "cpu"
                ) -> tuple[CollaborativeModel, list[ckpt.Checkpoint], dict]:
    """The finished stage-1 model (``siren.load``), each expert's checkpoint and run_dir/config.json."""
    from siren import load

    model = load(run_dir, device)
    stage1 = [ckpt.load_latest(ckpt.expert_dir(run_dir, k)) for k in range(model.cfg.n_experts)]
    return model, stage1, ckpt.read_run_config(run_dir)


def _link_tree(src: Path, dest: Path, how: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if not f.is_file():
            continue
        if how == "symlink":
            (dest / f.name).symlink_to(f.resolve())
            continue
        if how == "hardlink":
            try:
                os.link(f, dest / f.name)
                continue
            except OSError:  # another filesystem: copy
                pass
        shutil.copy2(f, dest / f.name)


def prepare_out(cfg: AlignConfig, stage1: list[ckpt.Checkpoint], run_cfg: dict, trainable: list[int],
                ids: dict) -> None:
    """Create ``out`` (config.json, frozen experts, alignment.json) or check it belongs to this config."""
    out = Path(cfg.out)
    meta = {"config": to_dict(cfg), "source_run": str(Path(cfg.run_dir).resolve()),
            "source_checkpoints": {k: str(c.path.resolve()) for k, c in enumerate(stage1)},
            "trainable_experts": trainable, **ids}
    path = out / "alignment.json"
    if path.exists():
        saved = ckpt.read_json(path)
        ckpt.check_config({k: v for k, v in saved.items() if k != "config"},
                          {k: v for k, v in json.loads(json.dumps(meta)).items() if k != "config"},
                          f"{path}", fix="This out= directory belongs to another stage-1 run or reward; use another out=.")
        ckpt.check_config({"config": saved["config"]}, {"config": json.loads(json.dumps(to_dict(cfg)))}, f"{path}",
                          ignore=tuple(f"config.{k}" for k in RESUMABLE_CHANGES),
                          fix="Only these keys may change on resume: " + ", ".join(RESUMABLE_CHANGES) + ".")
        return
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"out={out} exists and is not a stage-2 run (no alignment.json); choose a new out=")
    out.mkdir(parents=True, exist_ok=True)
    io.write_json(out / "config.json", run_cfg)
    for k, c in enumerate(stage1):
        if k in trainable:
            continue
        edir = ckpt.expert_dir(out, k)
        shutil.rmtree(edir, ignore_errors=True)
        _link_tree(c.path, edir / c.path.name, cfg.link)
        io.write_text(edir / "latest", c.path.name + "\n")
    io.write_json(path, meta)  # last: its presence means the frozen experts are in place


# ---------------------------------------------------------------------------- the loop

@dataclass
class AlignResult:
    status: str  # "finished" | "preempted"
    step: int
    out: Path


def _autocast(cfg: AlignConfig, device: torch.device):
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _chunks(idx: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(idx.split(size or max(1, len(idx)))) if len(idx) else []


class _Means:
    """Token-weighted means of per-micro-batch statistics (min/max kept as such)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.w = 0.0
        self.lo, self.hi = float("inf"), float("-inf")

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        n = float(stats.get("tokens", torch.tensor(1.0)))
        for k, v in stats.items():
            if k in ("ratio_min", "ratio_max", "tokens"):
                continue
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * n
        self.w += n
        if "ratio_min" in stats:
            self.lo, self.hi = min(self.lo, float(stats["ratio_min"])), max(self.hi, float(stats["ratio_max"]))

    def result(self) -> dict[str, float]:
        out = {k: v / max(self.w, 1e-12) for k, v in self.sums.items()}
        if self.lo <= self.hi:
            out.update(ratio_min=self.lo, ratio_max=self.hi)
        return out


def _logprobs(experts: list[Expert], ro: Rollouts, idx: torch.Tensor, cfg: AlignConfig,
              device: torch.device) -> torch.Tensor:
    with _autocast(cfg, device):
        return action_logprobs(experts, ro.codes[idx], ro.text[idx], ro.text_mask[idx], cfg.sample.temperature)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = opt.state_dict()
    return {f"optim.{i}.{n}": t for i, st in sd["state"].items() for n, t in st.items()}, sd["param_groups"]


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = t
    opt.load_state_dict({"state": state, "param_groups": groups})


def align(cfg: AlignConfig, model: CollaborativeModel, stage1: list[ckpt.Checkpoint], prompts: Sequence[str],
          encode_text: Callable, reward, codec=None, handle_signals: bool = True) -> AlignResult:
    """Run stage 2 from the stage-1 ``model`` into ``cfg.out`` (prepared by ``prepare_out``),
    resuming from ``out/rl/state.json`` when present."""
    out = Path(cfg.out)
    device = next(model.parameters()).device
    trainable = trainable_experts(model.cfg.n_experts, cfg.align, cfg.n)
    model.eval().requires_grad_(False)  # every expert frozen ...
    policy = [model.experts[k] for k in trainable]
    for e in policy:  # ... but the trainable ones (their frozen code tables are buffers)
        e.requires_grad_(True)
    need_ref = cfg.method == "dpo" or cfg.log_kl or cfg.kl_coef > 0
    reference = [copy.deepcopy(e).requires_grad_(False) for e in policy] if need_ref else None
    opts = [torch.optim.AdamW(param_groups(e, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
            for e in policy]
    params = [p for e in policy for p in e.parameters() if p.requires_grad]

    def save(step: int) -> None:
        for k, e, opt in zip(trainable, policy, opts):
            tensors, groups = _optimizer_tensors(opt)
            src = stage1[k].state
            state = {**{key: v for key, v in src.items() if key not in ("step", "format")}, "stage": 2,
                     "stage1_step": src.get("step"), "rl_step": step, "rl": to_dict(cfg), "rl_optimizer": groups,
                     "finished": step >= cfg.steps}
            ckpt.save(ckpt.expert_dir(out, k), step, e.state_dict(), tensors, state, cfg.keep_last)
        io.write_json(out / "rl" / "state.json", {"step": step})  # commit point: every expert has `step`

    start = 0
    state_file = out / "rl" / "state.json"
    if state_file.exists():
        start = int(ckpt.read_json(state_file)["step"])
        for k, e, opt in zip(trainable, policy, opts):
            c = ckpt.Checkpoint(ckpt.expert_dir(out, k) / ckpt.step_name(start))
            e.load_state_dict(c.model_state())
            _load_optimizer(opt, c.trainer_state(), c.state["rl_optimizer"])
        print(f"[siren.rl] resuming {out} from step {start}", file=sys.stderr)
    else:
        save(0)  # out/ is a loadable run from the start (step 0 = the stage-1 weights)
    if start >= cfg.steps:
        return AlignResult("finished", start, out)

    log = RunLog(out / "rl", start, True)
    stop = StopRequest()
    if handle_signals:
        stop.install()
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=start, desc=f"align {cfg.method} experts {trainable}", dynamic_ncols=True)
    result = None
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            captions = prompt_batch(prompts, step, cfg.batch, cfg.seed)  # Algorithm 3 line 2
            # line 3: the old policy is the current one; line 4-5: rollouts and rewards (Eq. 8)
            with _autocast(cfg, device):
                ro = collect(model, captions, encode_text, cfg.group, cfg.n_frames, cfg.sample,
                             seed=cfg.seed * 1_000_003 + step, reward=reward, codec=codec,
                             rollout_batch=cfg.rollout_batch, decode_batch=cfg.decode_batch)
            t1 = time.perf_counter()
            r = ro.rewards
            entry = {"step": step + 1, "reward_mean": float(r.mean()), "reward_std": float(r.std(correction=0)),
                     "reward_min": float(r.min()), "reward_max": float(r.max()),
                     "reward_group_std": float(r.std(dim=1, correction=0).mean()), "lr": cfg.lr}
            every = torch.arange(len(ro.captions), device=device)
            with torch.no_grad():
                logp_old = torch.cat([_logprobs(policy, ro, i, cfg, device) for i in _chunks(every, cfg.micro_batch)])
                logp_ref = (torch.cat([_logprobs(reference, ro, i, cfg, device)
                                       for i in _chunks(every, cfg.micro_batch)]) if reference else None)
            if logp_ref is not None:  # KL(pi_old || stage-1) on the rollouts just sampled
                entry["kl"] = float(obj.kl_to_reference(logp_old, logp_ref, ro.mask).mean())
            update = _grpo_update if cfg.method == "grpo" else _dpo_update
            entry.update(update(cfg, policy, opts, params, ro, logp_old, logp_ref, device))
            entry["time_rollout_s"], entry["time_update_s"] = t1 - t0, time.perf_counter() - t1
            done = step + 1
            bar.update(1)
            bar.set_postfix(reward=f"{entry['reward_mean']:.4f}", skipped=entry["skipped"])
            if done % cfg.log_every == 0 or done == cfg.steps or entry["skipped"]:
                log.write(entry)
            stopping = stop.signum is not None
            if stopping or done % cfg.ckpt_every == 0 or done == cfg.steps:
                save(done)
            if stopping:
                result = AlignResult("preempted", done, out)
                break
        else:
            result = AlignResult("finished", cfg.steps, out)
    finally:
        bar.close()
        log.close()
        if result is not None and result.status == "preempted":
            stop.chain()
        else:
            stop.restore()
    return result


def _step(params: list[torch.Tensor], opts: list[torch.optim.Optimizer], grad_clip: float) -> float:
    """Clip the global grad norm and step; a NaN/inf gradient raises before any weight changes
    (the last checkpoint stays the newest good state)."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"), error_if_nonfinite=True)
    for opt in opts:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return float(norm)


def _grpo_update(cfg: AlignConfig, policy, opts, params, ro: Rollouts, logp_old, logp_ref, device) -> dict:
    """Algorithm 3 lines 6-9: Eq. 9 advantages, the gamma filter, mu steps on -J (Eq. 10)."""
    adv, degenerate = obj.group_advantages(ro.rewards)  # Eq. 9, [B, G]
    adv = adv.flatten().to(device)
    keep = obj.keep_mask(adv, cfg.gamma)
    kept = keep.nonzero().flatten()
    n = len(ro.captions)
    entry = {"kept": len(kept), "filtered_frac": 1.0 - len(kept) / n, "degenerate_groups": int(degenerate.sum()),
             "skipped": int(len(kept) == 0)}
    if not len(kept):  # every rollout filtered: no update this step (logged)
        return entry
    means, losses, norms = _Means(), [], []
    for _ in range(cfg.mu):  # lines 7-9
        total = 0.0
        for idx in _chunks(kept, cfg.micro_batch):
            logp = _logprobs(policy, ro, idx, cfg, device)
            loss, stats = obj.grpo_loss(logp, logp_old[idx], adv[idx], ro.mask[idx], keep[idx], cfg.eps_d,
                                        cfg.eps_u, n_kept=len(kept),
                                        logp_ref=logp_ref[idx] if logp_ref is not None else None,
                                        kl_coef=cfg.kl_coef)
            loss.backward()
            total += float(loss.detach())
            means.add(stats)
        norms.append(_step(params, opts, cfg.grad_clip))
        losses.append(total)
    return {**entry, "loss": sum(losses) / len(losses), "grad_norm": sum(norms) / len(norms), **means.result()}


def _dpo_update(cfg: AlignConfig, policy, opts, params, ro: Rollouts, logp_old, logp_ref, device) -> dict:
    """Figure 5's DPO: best vs worst rollout of each group, frozen stage-1 reference, mu steps."""
    chosen, rejected, valid = obj.dpo_pairs(ro.rewards)
    chosen, rejected = chosen[valid].to(device), rejected[valid].to(device)
    pairs = len(chosen)
    entry = {"pairs": pairs, "filtered_frac": 1.0 - pairs / ro.rewards.shape[0],
             "degenerate_groups": int((~valid).sum()), "skipped": int(pairs == 0)}
    if not pairs:
        return entry
    ref_seq = obj.sequence_logp(logp_ref, ro.mask)
    means, losses, norms = _Means(), [], []
    for _ in range(cfg.mu):
        total = 0.0
        for sel in _chunks(torch.arange(pairs, device=device), max(1, cfg.micro_batch // 2)):
            idx = torch.cat([chosen[sel], rejected[sel]])
            seq = obj.sequence_logp(_logprobs(policy, ro, idx, cfg, device), ro.mask[idx])
            loss, stats = obj.dpo_loss(seq[:len(sel)], seq[len(sel):], ref_seq[chosen[sel]], ref_seq[rejected[sel]],
                                       cfg.beta)
            loss = loss * len(sel) / pairs  # mean over all pairs across micro-batches
            loss.backward()
            total += float(loss.detach())
            means.add({**stats, "tokens": torch.tensor(float(len(sel)))})
        norms.append(_step(params, opts, cfg.grad_clip))
        losses.append(total)
    return {**entry, "loss": sum(losses) / len(losses), "grad_norm": sum(norms) / len(norms), **means.result()}


# ---------------------------------------------------------------------------- CLI

def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _check_same(run_cfg: dict, what: str, built: str, how: str, cfg: AlignConfig) -> None:
    """The rollouts must use the codec / text encoder the stage-1 experts were trained with."""
    want = (run_cfg.get(what) or {}).get("id")
    if want != built:
        raise ConfigError(f"{cfg.run_dir} was trained with {what} {want}; {how} builds {built}. "
                          f"Set {what}.* to the stage-1 run's ({(run_cfg.get(what) or {}).get('weights')} weights).")


def main(argv: Sequence[str] | None = None, clap=None) -> int:
    """CLI entry: 0 when finished, EXIT_PREEMPTED (75) when a signal stopped it after a checkpoint.

    ``clap``: an already built ``siren.clap.Clap`` with the text encoder's weights, to reuse
    (a driver running several alignments in one process builds it once)."""
    cfg = parse(sys.argv[1:] if argv is None else argv)
    if not cfg.prompts:
        raise ConfigError("prompts= is required: a .txt/.csv/.jsonl of captions (the paper: the top 1k pairs by "
                          "CLAP score)")
    prompts = read_prompts(cfg.prompts)
    device = _device(cfg.device)
    model, stage1, run_cfg = load_stage1(cfg.run_dir, device)

    from siren.clap import Clap, ClapConfig
    from siren.codec import Codec
    from siren.text import TextEncoder

    from siren.rl.reward import build_reward

    codec = None
    if cfg.reward.name != "code_match":  # rewards on audio: decode with the stage-1 run's codec
        codec = Codec(cfg.codec).to(device)
        _check_same(run_cfg, "codec", codec.id, f"codec.weights={cfg.codec.weights} codec.seed={cfg.codec.seed}", cfg)
    clap = clap if clap is not None else Clap(ClapConfig(weights=cfg.text.weights, seed=cfg.text.seed))
    text_encoder = TextEncoder(cfg.text, clap=clap.to(device))
    _check_same(run_cfg, "text", text_encoder.id, f"text.weights={cfg.text.weights} text.seed={cfg.text.seed}", cfg)
    reward = build_reward(cfg.reward, device, clap=text_encoder.clap)
    if reward.needs_audio != (codec is not None):
        raise AssertionError(f"reward {reward.id}: needs_audio={reward.needs_audio} but codec is {codec}")
    labels = {"reward": reward.weights_label, "text": text_encoder.weights_label,
              "codec": codec.weights_label if codec is not None else "unused"}
    ids = {"reward_id": reward.id, "codec_id": codec.id if codec is not None else None,
           "text_id": text_encoder.id, "weights_labels": labels}
    if any(v == "random" for v in labels.values()):
        print(f"[siren.rl] WARNING: random weights ({labels}): rewards and the aligned model are smoke-test "
              f"outputs, not results", file=sys.stderr)
    trainable = trainable_experts(model.cfg.n_experts, cfg.align, cfg.n)
    prepare_out(cfg, stage1, run_cfg, trainable, ids)

    def encode_text(caps: list[str]):
        return text_encoder.encode(caps)

    result = align(cfg, model, stage1, prompts, encode_text, reward, codec)
    if result.status == "preempted":
        print(f"[siren.rl] stopped by signal at step {result.step}; checkpoint in {result.out}; "
              f"exit {EXIT_PREEMPTED} (requeue)", file=sys.stderr)
        return EXIT_PREEMPTED
    print(f"[siren.rl] {cfg.method} {cfg.align} n={cfg.n} finished at step {result.step}: {result.out} "
          f"(log {result.out / 'rl' / 'log.jsonl'})", file=sys.stderr)
    return 0
