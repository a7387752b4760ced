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
clip 1.0, mu=2 (the clip acts from the second update on); std in Eq. 9 is the population std; J
averages over the KEPT rollouts (normalize=kept; normalize=group is Eq. 10's 1/G); the
models run in eval mode (no dropout) and sample at sample.temperature.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from siren import checkpoint as ckpt
from siren import io
from siren.config import to_dict
from siren.demo_weights import mode_words
from siren.errors import ConfigError
from siren.lock import hold
from siren.model import CollaborativeModel
from siren.rl import objective as obj
from siren.rl import update
from siren.rl.config import AlignConfig, parse, read_prompts
from siren.rl.rollout import collect, trainable_experts
from siren.rl.run_dir import LOCK, check_out, check_same, load_stage1, prepare_out
from siren.run_dir import warn_if_past_trained
from siren.runtime import (
    EXIT_PREEMPTED,
    RunLog,
    autocast,
    code_version,
    derive_seed,
    param_groups,
    read_log,
    resolve_device,
    stop_on_signal,
    warn_other_device,
)

log = logging.getLogger(__name__)

def prompt_batch(prompts: Sequence[str], step: int, batch: int, seed: int) -> list[str]:
    """Captions of step ``step``: an endless stream of seeded permutations (one per epoch),
    cut into batches, so a resumed run draws what the uninterrupted one drew."""
    n, out = len(prompts), []
    for pos in range(step * batch, (step + 1) * batch):
        epoch, i = divmod(pos, n)
        # the same seed number as step `epoch`'s rollouts (derive_seed(seed, 0, step)): a permutation of the prompts
        # and a sampler's draws from one seed are not the same numbers; kept, so stage 2's demo results stay
        order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, 0, epoch)))
        out.append(prompts[int(order[i])])
    return out


def fixed_prompts(prompts: Sequence[str], n: int) -> list[str]:
    """The prompts of the fixed-prompt reward (AlignConfig.fixed_every): n spread evenly over the file, so a
    file sorted by class or source still gives a mix."""
    return [prompts[i * len(prompts) // n] for i in range(min(n, len(prompts)))]


# ---------------------------------------------------------------------------- the loop

@dataclass
class AlignResult:
    status: str  # "finished" | "preempted"
    step: int
    out: Path


def align(cfg: AlignConfig, model: CollaborativeModel, stage1: list[ckpt.Checkpoint], prompts: Sequence[str],
          encode_text: Callable, reward, codec=None) -> AlignResult:
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
            tensors, groups = ckpt.optimizer_tensors(opt)
            src = stage1[k].state
            state = {**{key: v for key, v in src.items() if key not in ("step", "format")}, "stage": 2,
                     "stage1_step": src.get("step"), "rl_step": step, "rl": to_dict(cfg), "rl_optimizer": groups,
                     "finished": step >= cfg.steps, "device_type": device.type}
            ckpt.save(ckpt.expert_dir(out, k), step, e.state_dict(), tensors, state, cfg.keep_last)
        io.write_json(out / "rl" / "state.json", {"step": step}, durable=True)  # commit point: every expert has `step`

    start = 0
    state_file = out / "rl" / "state.json"
    if state_file.exists():
        start = ckpt.read_commit_step(state_file)
        # an earlier step is one every trained expert has a checkpoint of: the commit point names it, not `latest`
        saved = [{int(p.name[5:]) for p in ckpt.expert_dir(out, k).glob("step_*") if ckpt.STEP_DIR.match(p.name)}
                 for k in trainable]
        earlier = sorted(s for s in set.intersection(*saved) if s < start)
        fix = (f"Write an earlier step every trained expert has ({', '.join(map(str, earlier))}) into {state_file} "
               f'as {{"step": N}} to resume from there.' if earlier else
               f"There is no earlier step: delete {out} to start stage 2 again.")
        for k, e, opt in zip(trainable, policy, opts):
            c = ckpt.Checkpoint(ckpt.expert_dir(out, k) / ckpt.step_name(start))
            weights = c.model_state()
            ckpt.check_finite_checkpoint(c, weights, fix)
            ckpt.load_weights(e, weights, c.path / "model.safetensors")
            ckpt.load_optimizer(opt, c.trainer_state(device), c.state["rl_optimizer"], c.path)
        for k in trainable:  # a save killed between experts left these: the next save's keep_last would count them
            ckpt.drop_after(ckpt.expert_dir(out, k), start)
        log.info("resuming %s from step %d", out, start)
        warn_other_device(c.state.get("device_type"), device, f"stage 2 in {out}")
        if start > cfg.steps:  # `steps` may shorten a run, not below what it has trained
            raise ConfigError(f"{out} has trained {start} stage-2 steps, more than steps={cfg.steps}: set "
                              f"steps={start} or more. {fix}")
        if start == cfg.steps and not c.state["finished"]:  # stopped at what is now the last step: it loads as done
            save(start)
    else:
        save(0)  # out/ is a loadable run from the start (step 0 = the stage-1 weights)
    if start >= cfg.steps:
        return AlignResult("finished", start, out)

    from tqdm import tqdm

    def reward_fixed() -> float:  # the same prompts and seed each time: only the policy changes
        with autocast(cfg.precision, device):
            ro = collect(model, fixed_prompts(prompts, cfg.fixed_prompts), encode_text, cfg.group, cfg.n_frames,
                         cfg.sample, seed=derive_seed(cfg.seed, 1, 0), reward=reward, codec=codec,
                         rollout_batch=cfg.rollout_batch, decode_batch=cfg.decode_batch)
        return float(ro.rewards.mean())

    result = None
    with stop_on_signal() as stop, RunLog(out / "rl", start) as runlog, \
            tqdm(total=cfg.steps, initial=start, desc=f"align {cfg.method} experts {trainable}",
                 dynamic_ncols=True) as bar:
        # the fixed prompts' reward at the step resumed from, unless the log kept it: step 0 at the start (a run
        # stopped before its first checkpoint kept it), or a point skipped by a stop request at that step
        kept = read_log(out / "rl") if (out / "rl" / "log.jsonl").is_file() else []  # cut back to `start` by now
        if cfg.fixed_every and start % cfg.fixed_every == 0 and \
                not any(e.get("step") == start and "reward_fixed" in e for e in kept):
            runlog.write({"step": start, "reward_fixed": reward_fixed()})
        skipped, since = 0, []  # since: the entries of the steps not logged yet (log_every > 1)
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            captions = prompt_batch(prompts, step, cfg.batch, cfg.seed)  # Algorithm 3 line 2
            # line 3: the old policy is the current one; line 4-5: rollouts and rewards (Eq. 8)
            with autocast(cfg.precision, device):
                ro = collect(model, captions, encode_text, cfg.group, cfg.n_frames, cfg.sample,
                             seed=derive_seed(cfg.seed, 0, step), reward=reward, codec=codec,
                             rollout_batch=cfg.rollout_batch, decode_batch=cfg.decode_batch)
            t1 = time.perf_counter()
            r = ro.rewards
            entry = {"step": step + 1, "reward_mean": float(r.mean()), "reward_std": float(r.std(correction=0)),
                     "reward_min": float(r.min()), "reward_max": float(r.max()),
                     "reward_group_std": float(r.std(dim=1, correction=0).mean()), "lr": cfg.lr}
            # in the micro-batches of the update's first pass: on a GPU in bf16 a rollout's log-probs can depend
            # on the rollouts batched with it, and Eq. 11's first ratios (DPO's first margins) must be exactly 1 (0)
            chunks = update.first_pass_chunks(cfg, ro.rewards, device)
            with torch.no_grad():
                logp_old = update.logprobs_in(policy, ro, chunks, cfg, device)
                logp_ref = update.logprobs_in(reference, ro, chunks, cfg, device) if reference else None
            if logp_ref is not None:  # KL(pi_old || stage-1) on the rollouts just sampled
                entry["kl"] = float(obj.kl_to_reference(logp_old, logp_ref, ro.mask).mean())
            apply = update.grpo_update if cfg.method == "grpo" else update.dpo_update
            entry.update(apply(cfg, policy, opts, params, ro, logp_old, logp_ref, device, where=f"step {step + 1}"))
            entry["time_rollout_s"], entry["time_update_s"] = t1 - t0, time.perf_counter() - t1
            done = step + 1
            skipped += entry["skipped"]
            if cfg.fixed_every and done % cfg.fixed_every == 0 and stop.signum is None:  # a stop request
                entry["reward_fixed"] = reward_fixed()  # checkpoints first: the point is skipped, not worth the grace
            bar.update(1)
            bar.set_postfix(reward=f"{entry['reward_mean']:.4f}", skipped=entry["skipped"])
            stop.preempted = stop.signum is not None
            saving = stop.preempted or stop.save_due() or done % cfg.ckpt_every == 0 or done == cfg.steps
            since.append(entry)
            if done % cfg.log_every == 0 or saving or entry["skipped"] or "reward_fixed" in entry:
                runlog.write(merge_steps(since))  # at each checkpoint too: a resume starts after those steps
                since = []
            if saving:
                save(done)
            if stop.preempted and done < cfg.steps:  # a signal in the last step: finished, not to be requeued
                result = AlignResult("preempted", done, out)
                break
        else:
            result = AlignResult("finished", cfg.steps, out)
        if skipped:  # a constant reward (every group degenerate) or a gamma no rollout meets aligns nothing
            log.warning("%d of the %d stage-2 steps run now updated nothing: every rollout was left out (every "
                        "group's rewards equal, or no |A| >= gamma=%g); see 'skipped' and 'degenerate_groups' in %s",
                        skipped, result.step - start, cfg.gamma, out / "rl" / "log.jsonl")
    return result


SUMMED = ("skipped", "kept", "pairs", "degenerate_groups", "time_rollout_s", "time_update_s")  # counts and times


def merge_steps(entries: list[dict]) -> dict:
    """One log entry for the steps since the last (``log_every`` > 1), as stage 1 logs: the last step's number, lr
    and fixed-prompt reward; the extremes of the *_min / *_max keys (rewards, Eq. 11's ratios); sums of counts and
    times; means of the rest (of the steps that have the key: a skipped step has no loss); ``steps``: how many."""
    if len(entries) == 1:
        return entries[0]
    out = {**entries[-1], "steps": len(entries)}
    for key in {k for e in entries for k in e} - {"step", "lr", "reward_fixed"}:
        vals = [e[key] for e in entries if key in e]
        out[key] = (min(vals) if key.endswith("_min") else max(vals) if key.endswith("_max") else
                    sum(vals) if key in SUMMED else sum(vals) / len(vals))
    return out


def main(argv: Sequence[str] | None = None, clap=None) -> int:
    """CLI entry: 0 when finished, EXIT_PREEMPTED (75) when a signal stopped it after a checkpoint.

    ``clap``: an already built ``siren.clap.Clap`` with the text encoder's weights, to reuse
    (a driver running several alignments in one process builds it once)."""
    from siren import cli
    from siren.frontends import build_codec, build_text, check_keys
    from siren.rl.reward import build_reward

    cfg = parse(cli.start(argv))
    if not cfg.prompts:
        raise ConfigError("prompts= is required: a .txt/.csv/.jsonl of captions (the paper: the top 1k pairs by "
                          "CLAP score)")
    prompts = read_prompts(cfg.prompts)
    if len(prompts) < cfg.batch:  # the stream of permutations fills each batch: some prompts twice in one step
        log.warning("%s holds %d prompt(s), fewer than batch=%d: each step's batch holds some of them more than once",
                    cfg.prompts, len(prompts), cfg.batch)
    device = resolve_device(cfg.device)
    model, stage1, run_cfg = load_stage1(cfg.run_dir, device)
    trainable = trainable_experts(model.cfg.n_experts, cfg.align, cfg.n)  # before the frontends are built
    warn_if_past_trained(cfg.run_dir, cfg.n_frames, "stage 2 (rollouts)")

    audio = cfg.reward.name != "code_match"  # rewards on audio: decode with the stage-1 run's codec
    check_keys({w: (run_cfg.get(w) or {}).get("config") for w in ("codec", "text")},
               {"codec": cfg.codec, "text": cfg.text} if audio else {"text": cfg.text}, f"{cfg.run_dir} was trained")
    codec = None
    if audio:
        codec = build_codec(cfg.codec, device)
        check_same(run_cfg, "codec", codec.id, f"codec.weights={cfg.codec.weights} codec.seed={cfg.codec.seed}",
                   cfg.run_dir)
    text_encoder = build_text(cfg.text, device, clap=clap)
    check_same(run_cfg, "text", text_encoder.id, f"text.weights={cfg.text.weights} text.seed={cfg.text.seed}",
               cfg.run_dir)
    reward = build_reward(cfg.reward, device, clap=text_encoder.clap)
    if reward.needs_audio != (codec is not None):
        raise AssertionError(f"reward {reward.id}: needs_audio={reward.needs_audio} but codec is {codec}")
    labels = {"reward": reward.weights_label, "text": text_encoder.weights_label,
              "codec": codec.weights_label if codec is not None else "unused"}
    ids = {"reward_id": reward.id, "reward_model": {"name": reward.name, "weights_sha256": reward.weights_sha256},
           "codec_id": codec.id if codec is not None else None,
           "text_id": text_encoder.id, "weights_labels": labels,
           # the prompts themselves: batches are drawn by step from this list, so a resume on an edited file
           # would train on other batches under one run's name
           "prompts_sha256": io.sha256("\n".join(prompts))}
    log.info("stage 2 into %s: %s; code %s", cfg.out,
             "; ".join(f"{k}: {mode_words(v, k)}" for k, v in labels.items()), code_version())
    if any(v == "random" for v in labels.values()):
        log.warning("random weights (%s): rewards and the aligned model are smoke-test outputs, not results", labels)

    def encode_text(caps: list[str]):
        return text_encoder.encode(caps)

    check_out(cfg.out, len(stage1), trainable)
    # a second copy (the same job submitted twice) would set up out= under the first: rmtree its frozen experts
    with hold(Path(cfg.out) / LOCK, "a stage-2 alignment", "wait for it to finish, or give this one another out="):
        prepare_out(cfg, stage1, run_cfg, trainable, ids)
        result = align(cfg, model, stage1, prompts, encode_text, reward, codec)
    if result.status == "preempted":
        log.info("stopped by signal at step %d; checkpoint in %s; exit %d (requeue)", result.step, result.out,
                 EXIT_PREEMPTED)
        return EXIT_PREEMPTED
    log.info("%s %s n=%d finished at step %d: %s (log %s)", cfg.method, cfg.align, cfg.n, result.step, result.out,
             result.out / "rl" / "log.jsonl")
    return 0
