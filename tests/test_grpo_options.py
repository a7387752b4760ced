"""Stage-2 options of issue 12: rl.normalize (kept vs the paper's 1/G) in closed form and
rewards (and the captions' text states) computed in fp32 outside the caller's autocast."""
from __future__ import annotations

import math

import pytest
import torch

from siren.rl import objective as obj
from siren.rl.rollout import collect
from siren.sample import SampleConfig


def test_grpo_normalize_kept_and_group_in_closed_form():
    """Constant ratios per rollout make every J_i = min(r_i A_i, clip(r_i) A_i) by hand:
    group 0 rewards [0, 0, 0, 1] -> A = -1/sqrt3 (x3, dropped by gamma=0.6), sqrt3 (r=1.5 -> clipped to 1.28);
    group 1 rewards [0, 0, 1, 1] -> A = -1, -1, 1, 1 with r = 0.5, 1.0, 1.1, 2.0 -> J = -0.8, -1, 1.1, 1.28."""
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    ratios = torch.tensor([1.0, 1.0, 1.0, 1.5, 0.5, 1.0, 1.1, 2.0])
    logp_old = -torch.rand(8, 2, 3, generator=torch.Generator().manual_seed(0)) - 0.5
    logp = logp_old + ratios.log()[:, None, None]
    mask = torch.ones(8, 3, dtype=torch.bool)
    adv = obj.group_advantages(rewards)[0].flatten()
    keep = obj.keep_mask(adv, 0.6)
    assert keep.tolist() == [False, False, False, True, True, True, True, True]
    total = 1.28 * math.sqrt(3) - 0.8 - 1.0 + 1.1 + 1.28
    kept, _ = obj.grpo_loss(logp, logp_old, adv, mask, keep, 0.2, 0.28, normalize="kept")
    group, _ = obj.grpo_loss(logp, logp_old, adv, mask, keep, 0.2, 0.28, normalize="group")
    assert kept.item() == pytest.approx(-total / 5, rel=1e-5)  # 1/kept: 5 rollouts survive the filter
    assert group.item() == pytest.approx(-total / 8, rel=1e-5)  # Eq. 10: 1/G per group, mean over B=2 groups
    # micro-batches of the kept rollouts add up to the full-batch loss with n_total
    parts = sum(obj.grpo_loss(logp[s], logp_old[s], adv[s], mask[s], keep[s], 0.2, 0.28, n_kept=5,
                              normalize="group", n_total=8)[0] for s in (slice(3, 5), slice(5, 8)))
    assert parts.item() == pytest.approx(group.item(), rel=1e-6)
    with pytest.raises(ValueError, match="normalize"):
        obj.grpo_loss(logp, logp_old, adv, mask, keep, 0.2, 0.28, normalize="tokens")


class _Probe:
    """Records whether autocast was on when called (the codec and reward are not under test: collect's scope is)."""

    def __init__(self):
        self.autocast = []


class _ProbeCodec(_Probe):
    device = torch.device("cpu")

    def decode(self, codes):
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        return torch.randn(codes.shape[0], codes.shape[-1] * 320)


class _ProbeReward(_Probe):
    needs_audio, id = True, "probe"

    def __call__(self, wav, captions):
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        assert wav.dtype == torch.float32
        return wav.mean(-1)


def test_text_and_rewards_are_computed_outside_autocast():
    """The captions' states too: encoded under stage 2's bf16 autocast, the policy sampled (and its ratio was
    computed) on text states that differ from the fp32 ones stage 1 trained on and eval conditions with."""
    import tempfile
    from pathlib import Path

    from siren.rl import alignment
    from tests.fixtures_rl import HashedText, make_stage1_run

    class ProbeText(HashedText):
        autocast = []

        def __call__(self, captions):
            self.autocast.append(torch.is_autocast_enabled("cpu"))
            return super().__call__(captions)

    with tempfile.TemporaryDirectory() as d:
        model, _, _ = alignment.load_stage1(make_stage1_run(Path(d) / "run"))
    codec, reward, text = _ProbeCodec(), _ProbeReward(), ProbeText()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ro = collect(model, ["a dog barks", "rain"], text, group=2, n_frames=3, sample=SampleConfig(),
                     seed=0, reward=reward, codec=codec, decode_batch=2)
    assert codec.autocast == [False, False] and reward.autocast == [False, False] and text.autocast == [False]
    assert ro.rewards.dtype == torch.float32 and ro.rewards.shape == (2, 2)
