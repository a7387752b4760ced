"""Stage 2 (anti-causal alignment): the objective against an independent transcription of
Eq. 9-11, DPO against its closed form, then the trainer on tiny models."""
from __future__ import annotations

import math
import shutil

import pytest
import torch

from siren.rl import objective as obj

# ---------------------------------------------------------------- Eq. 9-11 on fixed tensors

def eq10_by_hand(logp, logp_old, rewards, mask, gamma, eps_d, eps_u):
    """J(theta) of Eq. 10 written out with loops and floats, independently of siren.rl."""
    B, G = len(rewards), len(rewards[0])
    A = []
    for b in range(B):  # Eq. 9
        mean = sum(rewards[b]) / G
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards[b]) / G)
        A += [(r - mean) / std if std > 0 else 0.0 for r in rewards[b]]
    kept = [i for i in range(B * G) if abs(A[i]) >= gamma and A[i] != 0.0]
    L, T = len(logp[0]), len(logp[0][0])
    total = 0.0
    for i in kept:
        frames = [t for t in range(T) if mask[i][t]]
        s = 0.0
        for t in frames:
            for j in range(L):
                r = math.exp(logp[i][j][t] - logp_old[i][j][t])  # Eq. 11
                v = min(max(r, 1 - eps_d), 1 + eps_u)
                s += min(r * A[i], v * A[i])
        total += s / len(frames) / L
    return total / len(kept), A, kept


@pytest.fixture
def fixed_batch():
    g = torch.Generator().manual_seed(0)
    B, G, L, T = 3, 4, 2, 5
    rewards = torch.tensor([[0.1, 0.9, 0.5, 0.45],  # one advantage near 0 -> gamma filter
                            [0.3, 0.3, 0.3, 0.3],  # all equal -> degenerate group
                            [-0.2, 0.4, 0.0, 0.7]])
    logp_old = -torch.rand(B * G, L, T, generator=g) * 3 - 0.1
    # ratios spread over [0.5, 1.6]: the clip binds on both sides for eps 0.2 / 0.28
    logp = logp_old + torch.log(0.5 + 1.1 * torch.rand(B * G, L, T, generator=g))
    mask = torch.ones(B * G, T, dtype=torch.bool)
    mask[1, 3:] = False  # padded frames must not count
    mask[9, 1:] = False
    return rewards, logp, logp_old, mask


def test_grpo_loss_matches_eq10_by_hand(fixed_batch):
    rewards, logp, logp_old, mask = fixed_batch
    gamma, eps_d, eps_u = 0.3, 0.2, 0.28
    want, A_hand, kept_hand = eq10_by_hand(logp.tolist(), logp_old.tolist(), rewards.tolist(), mask.tolist(),
                                           gamma, eps_d, eps_u)
    adv, degenerate = obj.group_advantages(rewards)
    assert degenerate.tolist() == [False, True, False]
    assert adv.flatten().tolist() == pytest.approx(A_hand, abs=1e-6)
    keep = obj.keep_mask(adv.flatten(), gamma)
    assert keep.nonzero().flatten().tolist() == kept_hand
    assert 0 < len(kept_hand) < 8  # the filter dropped something besides the degenerate group
    loss, stats = obj.grpo_loss(logp, logp_old, adv.flatten(), mask, keep, eps_d, eps_u)
    assert loss.item() == pytest.approx(-want, rel=1e-5)
    assert stats["clip_frac_low"] > 0 and stats["clip_frac_high"] > 0


def test_grpo_micro_batches_add_up_to_full_batch(fixed_batch):
    rewards, logp, logp_old, mask = fixed_batch
    adv = obj.group_advantages(rewards)[0].flatten()
    keep = obj.keep_mask(adv, 0.3)
    full, _ = obj.grpo_loss(logp, logp_old, adv, mask, keep, 0.2, 0.28)
    n = int(keep.sum())
    parts = sum(obj.grpo_loss(logp[s], logp_old[s], adv[s], mask[s], keep[s], 0.2, 0.28, n_kept=n)[0]
                for s in (slice(0, 5), slice(5, 12)))
    assert parts.item() == pytest.approx(full.item(), rel=1e-6)


def test_clip_zeroes_gradient_exactly_where_it_binds(fixed_batch):
    rewards, logp, logp_old, mask = fixed_batch
    eps_d, eps_u = 0.2, 0.28
    adv = obj.group_advantages(rewards)[0].flatten()
    keep = obj.keep_mask(adv, 0.3)
    logp = logp.clone().requires_grad_(True)
    loss, _ = obj.grpo_loss(logp, logp_old, adv, mask, keep, eps_d, eps_u)
    loss.backward()
    ratio = torch.exp(logp.detach() - logp_old)
    a = adv[:, None, None].expand_as(ratio)
    binds = ((a > 0) & (ratio > 1 + eps_u)) | ((a < 0) & (ratio < 1 - eps_d))
    live = keep[:, None, None] & mask[:, None, :] & ~binds
    assert (logp.grad[~live] == 0).all()
    # d(-J)/d logp = -r A / (n_kept l_i L) on live tokens
    frames = mask.sum(1).float()[:, None, None].expand_as(ratio)
    want = -ratio * a / (keep.sum() * frames * ratio.shape[1])
    torch.testing.assert_close(logp.grad[live], want[live].float())


def test_every_rollout_filtered_raises_for_the_caller_to_skip():
    rewards = torch.full((2, 4), 0.5)
    adv, degenerate = obj.group_advantages(rewards)
    assert degenerate.all() and (adv == 0).all() and not torch.isnan(adv).any()
    keep = obj.keep_mask(adv.flatten(), 0.0)
    assert not keep.any()
    z = torch.zeros(8, 2, 3)
    with pytest.raises(ValueError, match="filtered"):
        obj.grpo_loss(z, z, adv.flatten(), torch.ones(8, 3, dtype=torch.bool), keep, 0.2, 0.2)


def test_kl_estimator_is_zero_at_reference_and_positive_elsewhere():
    lp = -torch.rand(3, 2, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    assert obj.kl_to_reference(lp, lp, mask).abs().max() < 1e-7
    assert (obj.kl_to_reference(lp, lp - 0.3, mask) > 0).all()


def test_dpo_loss_matches_closed_form():
    rewards = torch.tensor([[0.1, 0.8, -0.3], [0.2, 0.2, 0.2], [0.5, 0.4, 0.6]])
    chosen, rejected, valid = obj.dpo_pairs(rewards)
    assert chosen[[0, 2]].tolist() == [1, 8]
    assert rejected[[0, 2]].tolist() == [2, 7] and valid.tolist() == [True, False, True]
    beta = 0.1
    pc, pr = torch.tensor([-10.0, -12.0], requires_grad=True), torch.tensor([-11.0, -9.5], requires_grad=True)
    rc, rr = torch.tensor([-10.5, -11.0]), torch.tensor([-10.0, -10.0])
    loss, stats = obj.dpo_loss(pc, pr, rc, rr, beta)
    margins = [beta * ((-10.0 + 10.5) - (-11.0 + 10.0)), beta * ((-12.0 + 11.0) - (-9.5 + 10.0))]
    want = sum(math.log(1 + math.exp(-m)) for m in margins) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    sig = [1 / (1 + math.exp(m)) for m in margins]  # d/dm of -log sigmoid(m) = -sigmoid(-m)
    assert pc.grad.tolist() == pytest.approx([-beta * s / 2 for s in sig], rel=1e-5)
    assert pr.grad.tolist() == pytest.approx([beta * s / 2 for s in sig], rel=1e-5)
    assert stats["dpo_accuracy"].item() == 0.5


def test_kl_penalty_enters_the_loss_like_eq10(fixed_batch):
    rewards, logp, logp_old, mask = fixed_batch
    adv = obj.group_advantages(rewards)[0].flatten()
    keep = obj.keep_mask(adv, 0.3)
    ref = logp_old - 0.2 * torch.rand(logp.shape, generator=torch.Generator().manual_seed(1))
    plain, _ = obj.grpo_loss(logp, logp_old, adv, mask, keep, 0.2, 0.28)
    with_kl, _ = obj.grpo_loss(logp, logp_old, adv, mask, keep, 0.2, 0.28, logp_ref=ref, kl_coef=0.5)
    kl = 0.0
    for i in keep.nonzero().flatten().tolist():  # k3 per token, averaged like Eq. 10
        frames = [t for t in range(mask.shape[1]) if mask[i, t]]
        s = sum(math.exp(ref[i, j, t] - logp[i, j, t]) - (ref[i, j, t] - logp[i, j, t]).item() - 1
                for t in frames for j in range(logp.shape[1]))
        kl += s / len(frames) / logp.shape[1]
    kl /= int(keep.sum())
    assert with_kl.item() == pytest.approx(plain.item() + 0.5 * kl, rel=1e-5)


# ---------------------------------------------------------------- the trainer on tiny models

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402

from siren import checkpoint as ckpt  # noqa: E402
from siren.config import ConfigError  # noqa: E402
from siren.errors import NonFiniteError, SirenError  # noqa: E402
from siren.rl import alignment  # noqa: E402
from siren.rl.reward import CodeMatchReward  # noqa: E402
from siren.rl.rollout import action_logprobs, trainable_experts  # noqa: E402
from siren.sample import SampleConfig, generate  # noqa: E402
from tests.fixtures_rl import PROMPTS, HashedText, make_stage1_run  # noqa: E402
from tests.helpers import overridden, run_as_main  # noqa: E402

TIME_KEYS = ("time_rollout_s", "time_update_s")


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    return make_stage1_run(tmp_path_factory.mktemp("stage1") / "run")


def run_align(stage1_dir, out, *args, reward=None, prompts=PROMPTS):
    cfg = alignment.parse(overridden([f"run_dir={stage1_dir}", f"out={out}", "batch=2", "group=4", "seconds=0.08",
                                      "device=cpu", "ckpt_every=2"], args))
    model, s1, run_cfg = alignment.load_stage1(cfg.run_dir)
    reward = reward or CodeMatchReward(0, 0, 256)
    alignment.prepare_out(cfg, s1, run_cfg, trainable_experts(model.cfg.n_experts, cfg.align, cfg.n),
                          {"reward_id": reward.id})
    result = alignment.align(cfg, model, s1, prompts, HashedText(), reward)
    return result, model


def read_log(out):
    return [json.loads(line) for line in (out / "rl" / "log.jsonl").read_text().splitlines()]


def test_trainable_experts_follow_table7():
    assert trainable_experts(6, "anti_causal", 1) == [0]
    assert trainable_experts(6, "anti_causal", 2) == [0, 1]
    assert trainable_experts(6, "causal", 1) == [5]
    for bad in (0, 7):
        with pytest.raises(ValueError, match="n="):
            trainable_experts(6, "anti_causal", bad)


def test_teacher_forced_logprobs_see_the_samplers_context(stage1):
    """Eq. 11's 'same context': greedy rollouts are the argmax of the teacher-forced logits of
    every expert on those very codes (a context mismatch would change some argmax)."""
    model, _, _ = alignment.load_stage1(stage1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # large weights: logits that depend strongly on the context (no collapse)
        for p in model.parameters():  # matrices only: large random biases (cross-attention's) are constant
            if p.dim() > 1:           # over time and would swamp the context
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    text = HashedText()(PROMPTS[:3])
    codes = generate(model, text, 5, SampleConfig(temperature=0), seed=0, progress=False)
    distinct = torch.tensor([[len(codes[b, j].unique()) for j in range(12)] for b in range(3)])
    assert (distinct > 1).float().mean() > 0.8
    for e in model.experts:
        with torch.no_grad():
            logits = e(codes, text.states, text.mask)
        assert torch.equal(logits.argmax(-1), codes[:, e.layers.start: e.layers.stop])
    lp = action_logprobs([model.experts[0]], codes, text.states, text.mask, temperature=0.7)
    want = torch.log_softmax(model.experts[0](codes, text.states, text.mask).float() / 0.7, -1)
    torch.testing.assert_close(lp, want.gather(-1, codes[:, :2, :, None]).squeeze(-1))


@pytest.mark.parametrize("align,n,layer", [("anti_causal", 1, 0), ("anti_causal", 2, 2), ("causal", 1, 10)])
def test_only_the_aligned_experts_change(stage1, tmp_path, align, n, layer):
    before, _, _ = alignment.load_stage1(stage1)
    out = tmp_path / "out"
    result, model = run_align(stage1, out, f"align={align}", f"n={n}", "steps=2", "lr=1e-2", "gamma=0",
                              reward=CodeMatchReward(layer, 0, 256))
    assert result.status == "finished"
    trainable = trainable_experts(6, align, n)
    for k in range(6):
        old, new = before.experts[k].state_dict(), model.experts[k].state_dict()
        same = all(torch.equal(old[key], new[key]) for key in old)
        assert same == (k not in trainable), f"expert {k}"
        edir = ckpt.expert_dir(out, k)
        saved = ckpt.load_latest(edir)
        if k in trainable:  # out/ holds the aligned weights
            assert saved.step == 2 and saved.state["stage"] == 2
            assert all(torch.equal(v, new[key]) for key, v in saved.model_state().items())
        else:  # the stage-1 checkpoint itself, linked
            src = ckpt.load_latest(ckpt.expert_dir(stage1, k))
            assert os.path.samefile(saved.path / "model.safetensors", src.path / "model.safetensors")


def test_grpo_raises_a_synthetic_code_reward(stage1, tmp_path):
    """30 steps of Eq. 10 on 'layer-0 code in [0, 256)' (1/4 by chance) lift the mean reward."""
    out = tmp_path / "out"
    run_align(stage1, out, "steps=30", "group=8", "seconds=0.12", "lr=1e-2", "gamma=0", "log_kl=true",
              "ckpt_every=100")
    log = read_log(out)
    first = sum(e["reward_mean"] for e in log[:5]) / 5
    last = sum(e["reward_mean"] for e in log[-5:]) / 5
    assert first < 0.3 and last > first + 0.12, [round(e["reward_mean"], 3) for e in log]
    assert log[-1]["kl"] > log[0]["kl"] >= 0  # moving away from the stage-1 policy, and measured


def test_mu_default_lets_the_clip_act(stage1, tmp_path):
    """With one update per rollout batch the policy is the old one at its only pass, so every ratio is 1 and
    Eq. 10's clip never acts; the default mu >= 2 updates again on the same rollouts, where it can."""
    for mu, moved in ((None, True), (1, False)):
        out = tmp_path / f"mu{mu}"
        run_align(stage1, out, "steps=1", "lr=1e-2", "gamma=0", *([f"mu={mu}"] if mu else []))
        e = read_log(out)[-1]
        assert (e["ratio_min"] < 1 < e["ratio_max"]) is moved, e
        assert moved or e["ratio_min"] == e["ratio_max"] == 1.0


@pytest.mark.parametrize("method,args", [("grpo", ("gamma=0.6", "micro_batch=3")), ("dpo", ("micro_batch=2",))])
def test_old_policy_logprobs_are_computed_in_the_first_updates_micro_batches(stage1, tmp_path, monkeypatch,
                                                                              method, args):
    """On a GPU in bf16 a rollout's log-probs can depend on the rollouts batched with it: the old policy's (and
    the reference's) are computed in the very micro-batches of the update's first pass, so that pass's Eq. 11
    ratios (DPO's margins) are exactly 1 (0). Every batch the update runs with gradients was first run without."""
    from siren.rl import update

    calls, real = [], update.logprobs

    def spy(experts, ro, idx, cfg, device):
        calls.append((torch.is_grad_enabled(), tuple(idx.tolist())))
        return real(experts, ro, idx, cfg, device)

    monkeypatch.setattr(update, "logprobs", spy)
    run_align(stage1, tmp_path / method, f"method={method}", "steps=2", "mu=1", "lr=1e-2", *args)
    steps = []  # per step: (the batches run without gradients, then those of the update's one pass)
    for grad, batch in calls:
        if not grad and (not steps or steps[-1][1]):
            steps.append((set(), []))
        steps[-1][1].append(batch) if grad else steps[-1][0].add(batch)
    assert steps and all(first for _, first in steps), calls
    for old, first in steps:
        assert set(first) <= old, (first, old)
        assert set().union(*old) == set(range(8))  # every rollout's (the KL log's)
    assert any(len(first[0]) < 8 and first[0] != tuple(range(len(first[0]))) for _, first in steps), calls


def test_fixed_prompt_reward_follows_the_policy_and_leaves_training_alone(stage1, tmp_path):
    """fixed_every: the same prompts and seed at step 0 and every N steps. On the synthetic reward above it
    rises with the policy; the run's weights and its per-step log are those of a run without it."""
    args = ("steps=20", "group=8", "seconds=0.12", "lr=1e-2", "gamma=0", "ckpt_every=100")
    _, plain = run_align(stage1, tmp_path / "plain", *args)
    _, probed = run_align(stage1, tmp_path / "probed", *args, "fixed_every=10", "fixed_prompts=2")
    for key, v in plain.experts[0].state_dict().items():
        assert torch.equal(v, probed.experts[0].state_dict()[key]), key
    log = read_log(tmp_path / "probed")
    fixed = {e["step"]: e["reward_fixed"] for e in log if "reward_fixed" in e}
    assert sorted(fixed) == [0, 10, 20] and fixed[20] > fixed[0] + 0.1, fixed
    strip = lambda log: [{k: v for k, v in e.items() if k not in (*TIME_KEYS, "reward_fixed")}  # noqa: E731
                         for e in log if e["step"] > 0]
    assert strip(log) == strip(read_log(tmp_path / "plain"))
    assert alignment.fixed_prompts(["a", "b", "c", "d", "e"], 2) == ["a", "c"]
    assert alignment.fixed_prompts(["a"], 8) == ["a"]


def test_every_rollout_filtered_skips_the_update_and_logs_it(stage1, tmp_path):
    before, _, _ = alignment.load_stage1(stage1)
    for method in ("grpo", "dpo"):
        out = tmp_path / method
        result, model = run_align(stage1, out, f"method={method}", "steps=2", "lr=1e-2",
                                  reward=CodeMatchReward(0, 0, 1024))  # always 1.0: every group degenerate
        assert result.status == "finished"
        log = read_log(out)
        assert [e["skipped"] for e in log] == [1, 1] and all(e["filtered_frac"] == 1.0 for e in log)
        assert all(e["degenerate_groups"] == 2 and e["reward_std"] == 0.0 for e in log)
        assert all(math.isfinite(v) for e in log for v in e.values())
        assert all(torch.equal(v, before.experts[0].state_dict()[k]) for k, v in model.experts[0].state_dict().items())


class SignalAt:
    """A reward that, at one call, sends this process SIGUSR2 (what SLURM sends before preemption)."""

    def __init__(self, reward, call: int):
        self.reward, self.call, self.n = reward, call, 0
        self.needs_audio, self.id, self.weights_label = reward.needs_audio, reward.id, reward.weights_label

    def __call__(self, x, captions):
        self.n += 1
        if self.n == self.call:
            os.kill(os.getpid(), signal.SIGUSR2)
        return self.reward(x, captions)


@pytest.mark.parametrize("method", ["grpo", "dpo"])
def test_preempted_run_resumes_to_the_same_numbers(stage1, tmp_path, method):
    args = (f"method={method}", "steps=4", "lr=1e-2", "gamma=0", "mu=2", "ckpt_every=10")
    _, straight = run_align(stage1, tmp_path / "a", *args)
    result, _ = run_align(stage1, tmp_path / "b", *args, reward=SignalAt(CodeMatchReward(0, 0, 256), call=2))
    assert result.status == "preempted" and result.step == 2
    assert json.loads((tmp_path / "b" / "rl" / "state.json").read_text())["step"] == 2
    # a restart from step 0 would end at the same weights (rollouts are seeded by step): count the steps it ran
    counted = SignalAt(CodeMatchReward(0, 0, 256), call=0)  # never signals; one reward call per step's rollouts
    result, resumed = run_align(stage1, tmp_path / "b", *args, reward=counted)
    assert result.status == "finished" and result.step == 4 and counted.n == 2  # steps 3 and 4
    for key, v in straight.experts[0].state_dict().items():
        assert torch.equal(v, resumed.experts[0].state_dict()[key]), key
    strip = lambda log: [{k: v for k, v in e.items() if k not in TIME_KEYS} for e in log]  # noqa: E731
    assert strip(read_log(tmp_path / "a")) == strip(read_log(tmp_path / "b"))


def test_a_save_killed_between_experts_twice_still_leaves_a_common_step(stage1, tmp_path, monkeypatch):
    """A save killed after expert 0 leaves it an uncommitted newer step. After a resume from the commit point,
    expert 0's next save counted that step among its keep_last and deleted the committed one: killed again
    before expert 1's save, no step was common to both, and the run could only start over. Now a resume deletes
    the uncommitted steps first."""
    real = alignment.ckpt.save

    def killed_after_expert_0_at(step):
        def save(edir, s, *args, **kwargs):
            if edir.name == "expert_1" and s == step:
                raise RuntimeError("node lost")
            return real(edir, s, *args, **kwargs)
        return save

    out, args = tmp_path / "o", ("n=2", "steps=6", "gamma=0", "lr=1e-2")
    monkeypatch.setattr(alignment.ckpt, "save", killed_after_expert_0_at(3))
    with pytest.raises(RuntimeError, match="node lost"):
        run_align(stage1, out, *args, "ckpt_every=1")
    assert ckpt.read_commit_step(out / "rl" / "state.json") == 2 and (out / "expert_0" / "step_00000003").is_dir()
    monkeypatch.setattr(alignment.ckpt, "save", killed_after_expert_0_at(4))
    with pytest.raises(RuntimeError, match="node lost"):
        run_align(stage1, out, *args, "ckpt_every=2")  # resumes from 2, killed again in step 4's save
    assert ckpt.read_commit_step(out / "rl" / "state.json") == 2 and (out / "expert_0" / "step_00000002").is_dir()
    monkeypatch.setattr(alignment.ckpt, "save", real)
    result, _ = run_align(stage1, out, *args, "ckpt_every=2")
    assert result.status == "finished" and result.step == 6


def test_fixed_prompt_points_survive_a_stop_and_a_crash(stage1, tmp_path):
    """A stop request skips the fixed-prompt point of its step (the checkpoint comes first): it was never computed
    afterwards, and a run that died before its first checkpoint logged step 0's point twice. Now the resumed run
    computes a missing point at the step it resumes from, and only then."""
    args = ("steps=4", "lr=1e-2", "gamma=0", "ckpt_every=10", "fixed_every=2", "fixed_prompts=2")

    def points(out):
        return [(e["step"], e["reward_fixed"]) for e in read_log(out) if "reward_fixed" in e]

    run_align(stage1, tmp_path / "a", *args)
    want = points(tmp_path / "a")
    assert [s for s, _ in want] == [0, 2, 4]
    # calls to the reward: 1 = step 0's point, 2 = step 1's rollouts, 3 = step 2's: the stop request comes there
    result, _ = run_align(stage1, tmp_path / "b", *args, reward=SignalAt(CodeMatchReward(0, 0, 256), call=3))
    assert result.status == "preempted" and result.step == 2 and [s for s, _ in points(tmp_path / "b")] == [0]
    run_align(stage1, tmp_path / "b", *args)
    assert points(tmp_path / "b") == want

    class DiesAt(CodeMatchReward):  # a crash (no checkpoint) in step 1: the run resumes from step 0
        calls = 0

        def __call__(self, x, captions):
            DiesAt.calls += 1
            if DiesAt.calls == 2:
                raise RuntimeError("node lost")
            return super().__call__(x, captions)

    with pytest.raises(RuntimeError, match="node lost"):
        run_align(stage1, tmp_path / "c", *args, reward=DiesAt(0, 0, 256))
    run_align(stage1, tmp_path / "c", *args)
    assert points(tmp_path / "c") == want


def test_a_non_finite_loss_stops_stage2_before_the_update(stage1, tmp_path, monkeypatch):
    out = tmp_path / "o"
    real, calls = obj.grpo_loss, []

    def nan_at_step_2(*args, **kw):  # mu=1, one micro-batch: the second call is step 2's loss
        loss, stats = real(*args, **kw)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), stats

    monkeypatch.setattr(alignment.obj, "grpo_loss", nan_at_step_2)
    with pytest.raises(NonFiniteError, match=r"stage 2, step 2.*non-finite loss \(nan\).*stopped before "
                                                       r"the update, nothing saved"):
        run_align(stage1, out, "steps=3", "ckpt_every=1", "mu=1", "micro_batch=64")
    assert json.loads((out / "rl" / "state.json").read_text())["step"] == 1  # the last finite step is the newest
    monkeypatch.setattr(alignment.obj, "grpo_loss", real)
    result, _ = run_align(stage1, out, "steps=3", "ckpt_every=1", "mu=1", "micro_batch=64")
    assert result.status == "finished" and result.step == 3


def test_a_non_finite_reward_stops_stage2_with_one_error_line(stage1, tmp_path):
    from siren.errors import SirenError

    class NanReward(CodeMatchReward):
        def __call__(self, x, captions):
            r = super().__call__(x, captions)
            r[1] = float("nan")
            return r

    with pytest.raises(SirenError, match=r"returned non-finite values for rollouts \[1\]"):  # siren.cli: one line
        run_align(stage1, tmp_path / "o", "steps=1", reward=NanReward(0, 0, 256))


def test_a_resume_from_non_finite_weights_names_the_stage2_fix(stage1, tmp_path):
    # stage 2 resumes from rl/state.json, not from an expert's `latest`: the stage-1 fix (point `latest` at an
    # earlier step) led to "missing checkpoint file .../state.json"
    out = tmp_path / "o"
    run_align(stage1, out, "steps=2", "ckpt_every=1", "keep_last=3")
    (k,) = [int(d.name.split("_")[1]) for d in out.glob("expert_*") if (d / ckpt.step_name(2)).is_dir()]
    bad = ckpt.expert_dir(out, k) / ckpt.step_name(2) / "model.safetensors"
    from safetensors.torch import load_file

    from siren import io

    weights = load_file(bad)
    io.save_tensors(bad, {name: v.fill_(float("nan")) if i == 0 else v for i, (name, v) in enumerate(weights.items())})
    state = json.loads((bad.parent / "state.json").read_text())
    del state["sha256"]  # as an older version wrote it: no digests (with them, the replaced file is refused as such)
    (bad.parent / "state.json").write_text(json.dumps(state))
    with pytest.raises(ckpt.CheckpointError, match=r'Write an earlier step every trained expert has \(0, 1\) into '
                                                   r'.*state\.json as \{"step": N\}'):
        run_align(stage1, out, "steps=3", "ckpt_every=1", "keep_last=3")
    (out / "rl" / "state.json").write_text('{"step": 1}')  # the fix, as the message gives it
    result, _ = run_align(stage1, out, "steps=3", "ckpt_every=1", "keep_last=3")
    assert result.status == "finished" and result.step == 3


def test_a_sigterm_inside_slurm_checkpoints_and_goes_on(stage1, tmp_path, monkeypatch):
    # preemption and `scancel` send SIGTERM before SIGUSR2: stage 2 writes a checkpoint at the next step
    # boundary and trains on (stopping would exit before submitit requeues), as stage 1 does
    class TermAt(SignalAt):
        def __call__(self, x, captions):
            self.n += 1
            if self.n == self.call:
                os.kill(os.getpid(), signal.SIGTERM)
            return self.reward(x, captions)

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    args = ("steps=4", "ckpt_every=10", "keep_last=3")
    result, _ = run_align(stage1, tmp_path / "o", *args, reward=TermAt(CodeMatchReward(0, 0, 256), call=2))
    assert result.status == "finished" and result.step == 4
    (expert,) = [d for d in (tmp_path / "o").glob("expert_*") if (d / ckpt.step_name(4)).is_dir()]
    assert sorted(d.name for d in expert.glob("step_*")) == [ckpt.step_name(k) for k in (0, 2, 4)]


def test_resume_refuses_a_changed_objective(stage1, tmp_path):
    run_align(stage1, tmp_path / "o", "steps=1")
    with pytest.raises(ckpt.CheckpointError, match="gamma"):
        run_align(stage1, tmp_path / "o", "steps=2", "gamma=0.5")
    result, _ = run_align(stage1, tmp_path / "o", "steps=2")  # steps may grow
    assert result.step == 2


def test_a_corrupt_stage2_checkpoint_names_the_commit_point_to_rewrite(stage1, tmp_path):
    # the error said "delete this checkpoint directory"; then stage 2 looked for the step its rl/state.json names
    args = ("steps=2", "lr=1e-2", "gamma=0", "ckpt_every=1", "keep_last=3")
    run_align(stage1, tmp_path / "o", *args)
    (f,) = [f for f in (tmp_path / "o").glob("expert_*/step_00000002/model.safetensors")]
    f.write_bytes(f.read_bytes()[:100])
    state = tmp_path / "o" / "rl" / "state.json"
    with pytest.raises(ckpt.CheckpointError, match=f"delete {f.parent} and write an earlier step .* into {state}"):
        run_align(stage1, tmp_path / "o", "steps=3", *args[1:])
    shutil.rmtree(f.parent)
    state.write_text('{"step": 1}')
    assert run_align(stage1, tmp_path / "o", "steps=3", *args[1:])[0].step == 3


@pytest.mark.parametrize("text", ['{"Step": 4}', '{"step": "4"}', '{"step": -1}', '[4]'])
def test_a_hand_edited_commit_point_is_named(stage1, tmp_path, text):
    """The fixes tell users to write {"step": N} into rl/state.json by hand: a typo was a KeyError traceback."""
    import siren

    out = tmp_path / "out"
    run_align(stage1, out, "steps=2")
    (out / "rl" / "state.json").write_text(text)
    with pytest.raises(ckpt.CheckpointError, match=r'state.json: a commit point reads \{"step": N\}'):
        run_align(stage1, out, "steps=4")
    with pytest.raises(ckpt.CheckpointError, match=r'state.json: a commit point reads \{"step": N\}'):
        siren.load(out)


def test_steps_shortened_to_a_stopped_runs_step_loads_and_below_it_is_refused(stage1, tmp_path):
    # stopped at step 2 of 4, then steps=2: it said finished but its checkpoint said unfinished, and siren.load
    # refused it ("step 2 of <stage 1's train.steps>")
    import siren

    args = ("steps=4", "lr=1e-2", "gamma=0", "ckpt_every=10")
    result, _ = run_align(stage1, tmp_path / "b", *args, reward=SignalAt(CodeMatchReward(0, 0, 256), call=2))
    assert result.status == "preempted" and result.step == 2
    with pytest.raises(ConfigError, match="has trained 2 stage-2 steps, more than steps=1"):
        run_align(stage1, tmp_path / "b", "steps=1", "lr=1e-2", "gamma=0", "ckpt_every=10")
    result, _ = run_align(stage1, tmp_path / "b", "steps=2", "lr=1e-2", "gamma=0", "ckpt_every=10")
    assert result.status == "finished" and result.step == 2
    siren.load(tmp_path / "b")


def test_a_run_that_aligns_nothing_says_so(stage1, tmp_path, caplog):
    """A constant reward (every group degenerate) or a gamma no |A| can reach filtered out every rollout of
    every step: the run ended "finished" with the stage-1 weights, its only trace 'skipped' in the log."""
    import logging

    with caplog.at_level(logging.WARNING, logger="siren.rl.alignment"):
        result, _ = run_align(stage1, tmp_path / "o", "steps=2", reward=CodeMatchReward(0, -5, 1))  # always 0
    assert result.status == "finished"
    assert "2 of the 2 stage-2 steps run now updated nothing" in caplog.text
    # with the population std, |A| <= sqrt(G - 1): gamma above it can never be met
    alignment.parse(["run_dir=a", "out=b", "group=4", f"gamma={3 ** 0.5}"])
    with pytest.raises(ConfigError, match=r"gamma=1.8 can never be met with group=4: .* sqrt\(group - 1\) = 1.732"):
        alignment.parse(["run_dir=a", "out=b", "group=4", "gamma=1.8"])
    alignment.parse(["run_dir=a", "out=b", "group=4", "gamma=1.8", "method=dpo"])  # DPO has no gamma filter


def test_a_moved_out_resumes_where_it_is(stage1, tmp_path, monkeypatch):
    """out= was part of the recorded config: a run moved (or resumed through another relative path) was refused.
    Where things are may change on resume; what they are (the source run, the prompts' digest) may not."""
    import shutil

    args = ("lr=1e-2", "gamma=0", "ckpt_every=1")
    run_align(stage1, tmp_path / "a", "steps=1", *args)
    shutil.move(tmp_path / "a", tmp_path / "b")
    monkeypatch.chdir(stage1.parent)  # and the stage-1 run given by a relative path
    cfg = alignment.parse([f"run_dir={stage1.name}", f"out={tmp_path / 'b'}", "batch=2", "group=4",
                           "seconds=0.08", "device=cpu", "steps=2", *args])
    model, s1, run_cfg = alignment.load_stage1(cfg.run_dir)
    trainable = trainable_experts(model.cfg.n_experts, cfg.align, cfg.n)
    alignment.prepare_out(cfg, s1, run_cfg, trainable, {"reward_id": CodeMatchReward(0, 0, 256).id})
    counted = SignalAt(CodeMatchReward(0, 0, 256), call=0)  # never signals; one reward call per step's rollouts
    result = alignment.align(cfg, model, s1, PROMPTS, HashedText(), counted)
    # counted: a run that ignored its commit point and started over ends at step 2 with the same log
    assert result.status == "finished" and result.step == 2 and counted.n == 1
    assert [e["step"] for e in read_log(tmp_path / "b")] == [1, 2]
    with pytest.raises(ckpt.CheckpointError, match="config.lr"):  # what it trains with still may not change
        run_align(stage1, tmp_path / "b", "steps=3", "lr=1e-3", "gamma=0", "ckpt_every=1")


def test_resume_refuses_other_prompts(stage1, tmp_path):
    """Batches are drawn by step from the prompts list, and only its path was recorded: a resume on an edited
    file trained on other batches under one run's name. The list's digest is recorded and compared (a run set
    up before it was recorded resumes as before)."""
    cfg = alignment.parse([f"run_dir={stage1}", f"out={tmp_path / 'o'}", "device=cpu"])
    model, s1, run_cfg = alignment.load_stage1(cfg.run_dir)
    trainable = trainable_experts(model.cfg.n_experts, cfg.align, cfg.n)
    for digest in ("a", "a"):
        alignment.prepare_out(cfg, s1, run_cfg, trainable, {"reward_id": "r", "prompts_sha256": digest})
    with pytest.raises(ckpt.CheckpointError, match="prompts_sha256"):
        alignment.prepare_out(cfg, s1, run_cfg, trainable, {"reward_id": "r", "prompts_sha256": "b"})
    older = json.loads((tmp_path / "o" / "alignment.json").read_text())
    del older["prompts_sha256"]
    (tmp_path / "o" / "alignment.json").write_text(json.dumps(older))
    alignment.prepare_out(cfg, s1, run_cfg, trainable, {"reward_id": "r", "prompts_sha256": "b"})


def test_a_setup_stopped_part_way_runs_again(stage1, tmp_path):
    """Stopped after config.json and the frozen experts but before alignment.json, out= could never be set up
    again ("exists and is not a stage-2 run"); a folder holding only what the setup writes is set up anew."""
    out = tmp_path / "o"
    cfg = alignment.parse([f"run_dir={stage1}", f"out={out}", "device=cpu"])
    model, s1, run_cfg = alignment.load_stage1(cfg.run_dir)
    trainable = trainable_experts(model.cfg.n_experts, cfg.align, cfg.n)
    alignment.prepare_out(cfg, s1, run_cfg, trainable, {"reward_id": "r"})
    (out / "alignment.json").unlink()
    alignment.prepare_out(cfg, s1, run_cfg, trainable, {"reward_id": "r"})
    assert (out / "alignment.json").is_file()
    (out / "alignment.json").unlink()
    (out / "notes.txt").write_text("someone else's")
    with pytest.raises(SirenError, match="is not a stage-2 run"):
        alignment.check_out(out, len(s1), trainable)
    # a frozen expert's folder left as a link to another folder: the setup wrote through it, outside out=
    (out / "notes.txt").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    frozen = ckpt.expert_dir(out, next(k for k in range(len(s1)) if k not in trainable))
    shutil.rmtree(frozen)
    frozen.symlink_to(elsewhere, target_is_directory=True)
    alignment.prepare_out(cfg, s1, run_cfg, trainable, {"reward_id": "r"})
    assert not any(elsewhere.iterdir()) and frozen.is_dir() and not frozen.is_symlink()


def test_steps_between_log_entries_are_averaged_into_them(stage1, tmp_path):
    # log_every=3 logged steps 3 and 4 with only their own values: the rewards and losses of steps 1-2 were lost,
    # and reward_curves drew every third step
    _, _ = run_align(stage1, tmp_path / "each", "steps=4", "ckpt_every=4", "lr=1e-2")
    _, _ = run_align(stage1, tmp_path / "few", "steps=4", "ckpt_every=4", "lr=1e-2", "log_every=3")
    each, few = read_log(tmp_path / "each"), read_log(tmp_path / "few")
    assert [e["step"] for e in few] == [3, 4] and few[0]["steps"] == 3 and "steps" not in few[1]
    assert few[0]["reward_mean"] == pytest.approx(sum(e["reward_mean"] for e in each[:3]) / 3, abs=1e-12)
    for key, of in (("reward_min", min), ("ratio_min", min), ("ratio_max", max), ("degenerate_groups", sum),
                    ("kept", sum)):  # a clipping spike is kept, not averaged away; counts add up
        assert few[0][key] == of(e[key] for e in each[:3]), key
    assert few[1] == {**each[3], **{k: few[1][k] for k in ("time_rollout_s", "time_update_s")}}


def test_stage2_refuses_a_continuous_run_and_bad_reward_and_dpo_values(tmp_path):
    run = tmp_path / "cont"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"family": "continuous"}}))
    with pytest.raises(ConfigError, match="is a family=continuous run: stage 2 aligns RVQ-code experts"):
        alignment.load_stage1(run)  # was: AttributeError 'ContinuousConfig' object has no attribute 'n_experts'
    with pytest.raises(ConfigError, match="method=dpo needs beta > 0"):  # "finished" with grad_norm 0, nothing aligned
        alignment.parse(["run_dir=a", "out=b", "method=dpo", "beta=0"])
    with pytest.raises(ConfigError, match=r"reward.code_layer=12 .*a layer 0..11"):  # an IndexError after the setup
        alignment.parse(["run_dir=a", "out=b", "reward=code_match", "reward.code_layer=12"])
    with pytest.raises(ConfigError, match="is inside the stage-1 run: stage 2 writes a new run directory"):
        alignment.parse([f"run_dir={run}", f"out={run / 'sub'}"])


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="Valid keys:.*eps_u"):
        alignment.parse(["run_dir=a", "out=b", "eps_up=0.3"])
    with pytest.raises(ConfigError, match="method"):
        alignment.parse(["run_dir=a", "out=b", "method=ppo"])
    with pytest.raises(ConfigError, match="no diffusion steps"):  # a key stage 2 would not use
        alignment.parse(["run_dir=a", "out=b", "sample.diffusion_steps=10"])
    # a traceback in the first rollout, after out/ was set up with it (then a resume refused the fixed value)
    with pytest.raises(ConfigError, match="sample.temperature=0: stage 2 samples its rollouts"):
        alignment.parse(["run_dir=a", "out=b", "sample.temperature=0"])
    for truncated in ("sample.top_k=50", "sample.top_p=0.9"):  # rollouts from another policy than Eq. 7's
        with pytest.raises(ConfigError, match=r"sample.top_k=\d+ sample.top_p=[\d.]+: stage 2's policy is Eq. 7's"):
            alignment.parse(["run_dir=a", "out=b", truncated])
    assert alignment.parse(["run_dir=a", "out=b", "sample.top_p=1.0"]).sample.top_p == 1.0  # 1 = off


def test_imagebind_without_its_package_says_what_to_install(monkeypatch):
    """A machine without the [imagebind] extra (simulated: the package cannot be found) gets the install command."""
    import importlib.util
    import sys

    from siren.rl.imagebind import ImageBindReward

    find = importlib.util.find_spec
    monkeypatch.delitem(sys.modules, "imagebind", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "imagebind" else find(name, *a))
    with pytest.raises(ImportError, match=r'pip install -e "\.\[imagebind\]"'):
        ImageBindReward("random")


def test_aligned_run_directory_loads_like_a_stage1_run(stage1, tmp_path):
    import siren

    out = tmp_path / "out"
    _, model = run_align(stage1, out, "steps=2", "lr=1e-2", "gamma=0")
    loaded = siren.load(out)
    for k in range(6):
        for key, v in loaded.experts[k].state_dict().items():
            assert torch.equal(v, model.experts[k].state_dict()[key]), (k, key)
    meta = json.loads((out / "alignment.json").read_text())
    assert meta["trainable_experts"] == [0] and meta["source_run"] == str(stage1.resolve())


def test_a_stage2_run_killed_between_two_experts_saves_loads_at_its_commit_point(stage1, tmp_path):
    # each trained expert's `latest` moves before rl/state.json: killed between the two experts' step-2 saves,
    # siren.load(allow_unfinished=True) read expert 0 at step 2 and expert 1 at step 1
    import shutil

    import siren

    out = tmp_path / "out"
    run_align(stage1, out, "align=anti_causal", "n=2", "steps=2", "lr=1e-2", "gamma=0", "ckpt_every=1",
              "keep_last=3")
    shutil.rmtree(ckpt.expert_dir(out, 1) / ckpt.step_name(2))
    (ckpt.expert_dir(out, 1) / "latest").write_text(ckpt.step_name(1) + "\n")
    (out / "rl" / "state.json").write_text('{"step": 1}')
    loaded = siren.load(out, allow_unfinished=True)
    for k in (0, 1):
        at_1 = ckpt.Checkpoint(ckpt.expert_dir(out, k) / ckpt.step_name(1)).model_state()
        assert all(torch.equal(v, at_1[key]) for key, v in loaded.experts[k].state_dict().items()), k


def test_cli_end_to_end_with_random_clap_and_codec(tmp_path):
    """python -m siren.rl at demo scale: random DAC decodes the rollouts, random CLAP scores them."""
    import siren
    from siren.codec import Codec, CodecConfig
    from siren.text import TextConfig, TextEncoder

    codec = Codec(CodecConfig(weights="random"))
    text = TextEncoder(TextConfig(weights="random"))  # ~20 s on a busy CPU: built once, passed to main
    text_id = text.id
    run = make_stage1_run(tmp_path / "s1", tables=codec.code_tables(), codec_id=codec.id, text_id=text_id)
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("id,audio,caption\na,a.wav,a dog barks\nb,b.wav,rain on a tin roof\nc,c.wav,a bell rings\n")
    out = tmp_path / "aligned"
    args = [f"run_dir={run}", f"out={out}", f"prompts={prompts}", "align=anti_causal", "n=1", "method=grpo",
            "steps=2", "batch=2", "group=2", "seconds=0.1", "lr=1e-3", "device=cpu", "ckpt_every=1",
            "reward=clap", "reward.weights=random", "codec.weights=random", "text.weights=random"]
    assert alignment.main(args, clap=text.clap) == 0
    log = read_log(out)
    assert [e["step"] for e in log] == [1, 2]
    assert all(-1 <= e["reward_min"] <= e["reward_max"] <= 1 for e in log)
    meta = json.loads((out / "alignment.json").read_text())
    assert meta["weights_labels"] == {"reward": "random", "text": "random", "codec": "random"}
    assert meta["codec_id"] == codec.id and meta["text_id"] == text_id
    aligned, base = siren.load(out), siren.load(run)
    assert not torch.equal(aligned.experts[0].heads[0].weight, base.experts[0].heads[0].weight)
    assert all(torch.equal(a, b) for k in range(1, 6) for a, b in
               zip(aligned.experts[k].state_dict().values(), base.experts[k].state_dict().values()))
    # a stage-1 run made with another codec is refused, naming the key to fix
    with pytest.raises(ConfigError, match="codec.weights"):
        alignment.main([a.replace(str(out), str(tmp_path / "x")) for a in args] + ["codec.seed=1"], clap=text.clap)
    # `python -m siren.rl` with a mistyped key: the module's __main__, run here rather than in a new interpreter
    code, _, err = run_as_main("siren.rl", f"run_dir={run}", f"out={out}", "gamme=0")
    assert code == 2 and "Did you mean gamma" in err and "Valid keys" in err
    # the same job submitted twice: the second copy is refused before it sets up out= (it rmtree'd the frozen
    # experts the first was reading) or appends to its log
    from siren.lock import LockHeld, hold

    with hold(out / "align.lock", "a stage-2 alignment", "wait"):
        with pytest.raises(LockHeld, match=r"align\.lock: held by a stage-2 alignment .*another out="):
            alignment.main(overridden(args, ["steps=3"]), clap=text.clap)
    assert [e["step"] for e in read_log(out)] == [1, 2]
    # a folder of other things is refused before the lock is taken in it (align.lock was left in the user's folder)
    other = tmp_path / "data"
    other.mkdir()
    (other / "notes.txt").write_text("someone else's")
    with pytest.raises(SirenError, match="is not a stage-2 run"):
        alignment.main(overridden(args, [f"out={other}"]), clap=text.clap)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    # a stage-2 run as the source: its reward and its stage-1 step were lost from the new record, its aligned expert
    # taken as the stage-1 reference
    with pytest.raises(ConfigError, match=rf"run_dir={out} is a stage-2 run .*here {run.resolve()}; to train this "
                                          rf"one further, resume it"):
        alignment.main(overridden(args, [f"run_dir={out}", f"out={tmp_path / 'y'}"]), clap=text.clap)
    assert not (tmp_path / "y").exists()


def test_frontend_keys_other_than_the_runs_are_named_before_anything_is_built(tmp_path):
    """A run trained with other codec / text weights than the keys give (say demo, against the pretrained
    defaults) names every key to add, before a missing pretrained file could be the error."""
    from siren.codec import CodecConfig
    from siren.config import to_dict
    from siren.frontends import check_keys
    from siren.text import TextConfig

    run = make_stage1_run(tmp_path / "s1", frontends={"codec": to_dict(CodecConfig(weights="demo")),
                                                      "text": to_dict(TextConfig(weights="demo", seed=3))})
    prompts = tmp_path / "p.txt"
    prompts.write_text("a dog barks\n")
    args = [f"run_dir={run}", f"out={tmp_path / 'out'}", f"prompts={prompts}", "device=cpu"]
    with pytest.raises(ConfigError, match=r"add codec\.weights=demo text\.seed=3 text\.weights=demo$"):
        alignment.main([*args, "reward=clap"])
    with pytest.raises(ConfigError, match=r"add text\.seed=3$"):  # the codec is not used by code_match
        alignment.main([*args, "reward=code_match", "text.weights=demo"])
    assert not (tmp_path / "out").exists()
    # two paths to weights files: what they hold decides (check_same, after the build), not how they are written
    check_keys({"codec": {"weights": "/data/dac.pth", "seed": 0}}, {"codec": CodecConfig(weights="./dac.pth")}, "run")
    with pytest.raises(ConfigError, match=r"add codec\.weights=/data/dac\.pth$"):
        check_keys({"codec": {"weights": "/data/dac.pth", "seed": 0}}, {"codec": CodecConfig(weights="demo")}, "run")


def test_prompts_files_and_their_errors(tmp_path):
    (tmp_path / "p.txt").write_text("a dog barks\n\n  rain  \n")
    assert alignment.read_prompts(tmp_path / "p.txt") == ["a dog barks", "rain"]
    (tmp_path / "p.jsonl").write_text('{"caption": "a bell"}\n{"id": 3}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2"):
        alignment.read_prompts(tmp_path / "p.jsonl")
    (tmp_path / "p.csv").write_text('id,caption\n1,a bell\n2,""\n3,   \n')
    with pytest.raises(ValueError, match=r"p.csv:3: empty caption \(2 record"):
        alignment.read_prompts(tmp_path / "p.csv")
    (tmp_path / "p.csv").write_text("id,text\n1,a bell\n")
    with pytest.raises(ValueError, match="no 'caption' column"):
        alignment.read_prompts(tmp_path / "p.csv")
    # every prompt once per epoch, in a seeded order that does not depend on where a run resumed
    seen = [c for s in range(3) for c in alignment.prompt_batch(PROMPTS, s, 2, seed=0)]
    assert sorted(seen) == sorted(PROMPTS) and seen != PROMPTS
    # step 4 of batch 2 is positions 8-9: epoch 1 (of 6 prompts), places 2-3 of that epoch's own permutation,
    # drawn from the step alone (a resumed run draws it the same)
    order = torch.randperm(len(PROMPTS), generator=torch.Generator().manual_seed(alignment.derive_seed(0, 0, 1)))
    assert len(PROMPTS) == 6 and alignment.prompt_batch(PROMPTS, 4, 2, seed=0) == [PROMPTS[int(i)] for i in order[2:4]]


@pytest.mark.parametrize("clip", [0.5, 0.0])
def test_stage2_update_clips_the_global_gradient_norm(clip):
    """rl grad_clip over every trained expert's parameters together (0: unclipped): plain SGD at lr 1 makes the
    update the gradient the optimisers got."""
    from siren.rl.update import _step

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(3, 2))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    full = torch.cat([p.grad.flatten() for p in params]).norm()
    assert _step(params, [torch.optim.SGD(params[:1], lr=1.0), torch.optim.SGD(params[1:], lr=1.0)], clip, 0.1,
                 "test") == pytest.approx(float(full))
    moved = torch.cat([p.detach().flatten() for p in params]).norm()
    assert float(moved) == pytest.approx(clip if clip else float(full), rel=1e-5) and float(full) > 1


def test_stage1_training_refuses_a_stage2_run_folder(stage1, tmp_path):
    """`siren.train run_dir=<a stage-2 out=>` resumed its expert from stage 2's checkpoint (another optimiser state),
    trained stage-1 steps on it and moved `latest` past stage 2's commit point: siren.load gave the mix."""
    from siren.train import train
    from tests.fixtures_train import synthetic_data, tiny_config

    out = tmp_path / "rl"
    run_align(stage1, out, "steps=1", "ckpt_every=1")
    before = sorted(p.name for p in (out / "expert_0").iterdir())
    with pytest.raises(ConfigError, match=r"rl is a stage-2 run \(alignment\.json\); train stage 1 in a run_dir of "):
        train(tiny_config(out, "model.distribution=6-2", "expert=0"), synthetic_data(), handle_signals=False)
    assert sorted(p.name for p in (out / "expert_0").iterdir()) == before
    # a stage-2 checkpoint copied into a stage-1 folder (no alignment.json beside it) is refused by what it is
    from siren import checkpoint as ckpt
    from siren.run_record import check_resumable

    with pytest.raises(ConfigError, match=r"is a stage-2 \(alignment\) checkpoint"):
        check_resumable(ckpt.load_latest(ckpt.expert_dir(out, 0)), None, None, 1)


def test_a_resume_with_another_micro_or_decode_batch_says_its_numbers_move(stage1, tmp_path, caplog):
    # allowed on resume (a smaller GPU), but the steps that follow match neither run to the last bits: said now
    import logging

    args = ("steps=4", "lr=1e-2", "gamma=0", "ckpt_every=10")
    result, _ = run_align(stage1, tmp_path / "b", *args, reward=SignalAt(CodeMatchReward(0, 0, 256), call=2))
    assert result.status == "preempted"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="siren.rl.run_dir"):
        result, _ = run_align(stage1, tmp_path / "b", *args, "micro_batch=1", "decode_batch=1")
    assert result.status == "finished"
    said = [r.getMessage() for r in caplog.records]
    assert any("micro_batch=1, set up with 16: the update's gradients are summed in other groups" in m for m in said)
    assert any("decode_batch=1, set up with 8: the rollouts are decoded and scored in other batches" in m
               for m in said)
    # what does not move the numbers is not warned of: 16 and 32 both take a step's 8 rollouts at once, and
    # fixed_prompts without fixed_every measures nothing
    result, _ = run_align(stage1, tmp_path / "c", *args, reward=SignalAt(CodeMatchReward(0, 0, 256), call=2))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="siren.rl.run_dir"):
        run_align(stage1, tmp_path / "c", *args, "micro_batch=32", "fixed_prompts=3")
    assert not caplog.records
    # fixed_prompts where the fixed-prompt reward is measured (fixed_every > 0): its curve changes prompts
    fixed = (*args, "fixed_every=10")
    run_align(stage1, tmp_path / "d", *fixed, reward=SignalAt(CodeMatchReward(0, 0, 256), call=3))
    with caplog.at_level(logging.WARNING, logger="siren.rl.run_dir"):
        run_align(stage1, tmp_path / "d", *fixed, "fixed_prompts=3")
    assert "fixed_prompts=3, set up with 8: the fixed-prompt reward (Figure 5's curve) is measured on another set" \
        in caplog.text


def test_fewer_prompts_than_batch_is_said(tmp_path, caplog):
    # the stream of permutations fills each batch: some prompts twice in one step, in silence
    import logging

    (tmp_path / "p.txt").write_text("a dog barks\nrain\n")
    with caplog.at_level(logging.WARNING, logger="siren.rl.alignment"), pytest.raises(SirenError):
        alignment.main([f"run_dir={tmp_path / 'none'}", f"out={tmp_path / 'o'}", f"prompts={tmp_path / 'p.txt'}",
                        "batch=3"])
    assert "p.txt holds 2 prompt(s), fewer than batch=3: each step's batch holds some of them more than once" \
        in caplog.text
