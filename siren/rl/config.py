"""Stage-2 configuration (``python -m siren.rl key=value ...``): which experts align how, the
clipped-objective constants of Eq. 10, rollouts, optimiser, and the prompts file.

Choices the paper leaves open (stated so they can be changed): eps_d=0.2, eps_u=0.28 (the
DAPO clip-higher values), gamma=0.1, lr=1e-6 constant, AdamW without weight decay, grad
clip 1.0.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from siren.codec import FRAME_RATE, CodecConfig
from siren.config import load_config
from siren.errors import ConfigError
from siren.io import check_folder
from siren.rl.objective import NORMALIZE
from siren.rl.reward import RewardConfig
from siren.runtime import check_device, check_precision
from siren.sample import SampleConfig
from siren.text import TextConfig

METHODS = ("grpo", "dpo")
# Keys that may change when a run resumes: they cannot change the numbers of the steps already
# taken (steps extends or shortens the run; the rest is bookkeeping or memory). device too, but another device
# type changes the numbers of the steps to come (bf16 autocast, random draws): a resume says so (a warning).
RESUMABLE_CHANGES = ("steps", "log_every", "ckpt_every", "keep_last", "device", "micro_batch", "decode_batch",
                     "link", "fixed_every", "fixed_prompts")


@dataclass
class AlignConfig:
    run_dir: str = ""  # stage-1 run directory (read only)
    out: str = ""  # the new run directory (stage-1 experts linked + the aligned expert(s))
    prompts: str = ""  # captions: .txt (one per line) or .csv / .jsonl with a 'caption' column
    align: str = "anti_causal"  # anti_causal: train the first n experts | causal: the last n (Table 7)
    n: int = 1  # experts trained (1 = Siren, 2 = Table 7 row 2)
    method: str = "grpo"  # grpo (Eq. 10) | dpo (Figure 5)
    steps: int = 2000  # section 5.1: "2K more steps", read as rollout batches (x mu optimiser updates)
    batch: int = 8  # B prompts per step (Algorithm 3 line 2)
    group: int = 8  # G rollouts per prompt (line 4)
    mu: int = 2  # policy updates per rollout batch (line 7); the paper gives none. >= 2 so that the
    # eps_d/eps_u clip acts: the first update sees pi_theta = pi_old (every ratio 1), the second does not
    normalize: str = "kept"  # Eq. 10's sum over kept rollouts / kept (their number) | group (B*G: the paper's 1/G)
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
    # > 0: at step 0 and every fixed_every steps, the mean reward of `group` rollouts for each of fixed_prompts
    # prompts spread over the prompt file, sampled with one seed each time (rl/log.jsonl "reward_fixed"): a curve
    # of the policy alone, where reward_mean also moves with the prompts a step draws. Costs its rollouts.
    fixed_every: int = 0
    fixed_prompts: int = 8
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
        if self.normalize not in NORMALIZE:
            raise ConfigError(f"normalize must be one of {', '.join(NORMALIZE)}, got '{self.normalize}'")
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
        if self.method == "grpo" and self.gamma > math.sqrt(self.group - 1):
            # Eq. 9 with the population std: one rollout apart from G-1 equal ones has the largest |A|, sqrt(G-1)
            raise ConfigError(f"gamma={self.gamma} can never be met with group={self.group}: |A| is at most "
                              f"sqrt(group - 1) = {math.sqrt(self.group - 1):.4g}, so every rollout would be "
                              f"filtered out and nothing aligned. Lower gamma or raise group")
        for key in ("lr", "beta", "kl_coef", "weight_decay", "grad_clip", "seconds", "beta1", "beta2"):
            v = getattr(self, key)
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"{key} must be a finite number >= 0, got {v}")
        if self.lr == 0 or self.seconds == 0 or not (self.beta1 < 1 and self.beta2 < 1):
            raise ConfigError(f"need lr > 0, seconds > 0, beta1 < 1, beta2 < 1; got lr={self.lr}, "
                              f"seconds={self.seconds}, beta1={self.beta1}, beta2={self.beta2}")
        if self.method == "dpo" and self.beta == 0:  # its loss is log 2 with no gradient: "finished", nothing aligned
            raise ConfigError("method=dpo needs beta > 0: at beta=0 the DPO loss is constant and nothing is aligned")
        if self.fixed_prompts < 1:
            raise ConfigError(f"fixed_prompts must be >= 1, got {self.fixed_prompts}")
        if self.sample.temperature == 0:  # a traceback in the first rollout, after out/ was set up with it
            raise ConfigError("sample.temperature=0: stage 2 samples its rollouts and scores their log-probs at the "
                              "sampling temperature; greedy rollouts have neither. Give a temperature > 0 (default 1)")
        if self.sample.top_k or 0.0 < self.sample.top_p < 1.0:  # rollouts from a truncated policy, ratios of the full
            raise ConfigError(f"sample.top_k={self.sample.top_k} sample.top_p={self.sample.top_p}: stage 2's policy is "
                              f"Eq. 7's full softmax (at sample.temperature), whose log-probs Eq. 11's ratio and the "
                              f"KL read; truncated sampling would draw from another policy. Leave both at 0")
        if self.sample.diffusion_steps:  # stage 2 aligns RVQ-code experts (Algorithm 3): no diffusion head
            raise ConfigError(f"sample.diffusion_steps={self.sample.diffusion_steps}: stage 2 samples RVQ-code "
                              f"experts, which have no diffusion steps; leave it 0")
        for key in ("rollout_batch", "micro_batch", "seed", "fixed_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        check_precision(self.precision)
        check_device(self.device)
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
    out, run_dir = Path(cfg.out).resolve(), Path(cfg.run_dir).resolve()
    if out == run_dir or run_dir in out.parents:  # the stage-1 run is read, never written
        raise ConfigError(f"out={cfg.out} is {'the stage-1 run itself' if out == run_dir else 'inside the stage-1 run'}"
                          f": stage 2 writes a new run directory; give a folder outside {cfg.run_dir}")
    check_folder(cfg.out, "out")
    return cfg


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Captions from a .txt (one per line), or a .csv / .jsonl with a 'caption' column (siren.data.manifest)."""
    from siren.data.manifest import read_captions

    return read_captions(path)
