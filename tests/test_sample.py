"""Algorithm 2 sampler: shapes, seeds, cached == recomputed, greedy == teacher-forced argmax, failures."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from siren.config import ConfigError
from siren.model.config import ARCHS
from siren.sample import SampleConfig, generate, generate_with_info, sample_token
from tests.fixtures_model import text_batch, tiny_model  # noqa: F401


@dataclass
class FakeTextStates:  # the TextStates interface: .states [B, L, 768], .mask [B, L]
    states: torch.Tensor
    mask: torch.Tensor


@pytest.mark.parametrize("dist", ["6-2", "1-12"])
def test_shapes_and_range(dist):
    model = tiny_model(f"distribution={dist}")
    codes = generate(model, FakeTextStates(*text_batch(B=3)), 5, seed=0, progress=False)
    assert codes.shape == (3, 12, 5) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 1024


def test_seeded_determinism():
    model = tiny_model()
    text = text_batch()
    a = generate(model, text, 6, seed=3, progress=False)
    assert torch.equal(a, generate(model, text, 6, seed=3, progress=False))
    assert not torch.equal(a, generate(model, text, 6, seed=4, progress=False))


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("cond", ["accumulated", "residual", "none"])
def test_cached_equals_recomputed_prefix(cond, arch):
    model = tiny_model("distribution=4-3", f"conditioning={cond}", f"arch={arch}")
    text = text_batch()
    a = generate(model, text, 7, SampleConfig(top_k=50), seed=1, progress=False)
    b = generate(model, text, 7, SampleConfig(top_k=50, cached=False), seed=1, progress=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("cond", ["accumulated", "residual", "none"])
@pytest.mark.parametrize("dist", ["6-2", "3-4"])
def test_top_k_1_is_the_argmax_path(dist, cond, arch):
    """Every sampled code is the argmax of the teacher-forced logits on the sampled sequence."""
    model = tiny_model(f"distribution={dist}", f"conditioning={cond}", f"arch={arch}", seed=2)
    with torch.no_grad():  # a random init at 10x scale, so the greedy path moves (not one code forever)
        for p in model.parameters():
            p.mul_(10)
    text, mask = text_batch()
    codes, info = generate_with_info(model, (text, mask), 8, SampleConfig(top_k=1), seed=0, progress=False)
    assert (info.distinct > 1).float().mean() > 0.5
    with torch.no_grad():
        logits = model(codes, text, mask)
    assert torch.equal(logits.argmax(-1), codes)
    assert torch.equal(codes, generate(model, (text, mask), 8, SampleConfig(temperature=0), seed=5, progress=False))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_experts_see_codes_sampled_earlier_in_the_same_step(arch):
    """Algorithm 2: R_k reads this step's codes of experts < k; with greedy decoding the argmax
    check above covers it, and here flipping expert 0's head changes expert 1's first layer at t=0."""
    model = tiny_model("distribution=6-2", f"arch={arch}", seed=2)
    text = text_batch()
    a = generate(model, text, 1, SampleConfig(temperature=0), progress=False)
    head = model.experts[0].heads[1]
    c, other = int(a[0, 1, 0]), (int(a[0, 1, 0]) + 1) % 1024
    with torch.no_grad():  # swap two classes of the head: row 0's greedy layer-1 code becomes `other`
        for p in (head.weight, head.bias) if head.bias is not None else (head.weight,):
            p[[c, other]] = p[[other, c]]
    b = generate(model, text, 1, SampleConfig(temperature=0), progress=False)
    assert torch.equal(a[:, :1], b[:, :1]) and not torch.equal(a[:, 1], b[:, 1])
    assert not torch.equal(a[:, 2:], b[:, 2:])  # accumulated conditions carry it to later experts


def test_nan_logits_raise_with_step_and_expert():
    model = tiny_model()
    with torch.no_grad():
        model.experts[2].heads[1].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="step t=0, expert k=2, RVQ layer 5"):
        generate(model, text_batch(), 3, progress=False)


def test_collapse_is_reported():
    model = tiny_model("distribution=2-6", "head_bias=true")  # a bias to force one code
    with torch.no_grad():
        for e in model.experts:
            for head in e.heads:
                head.weight.zero_()
                head.bias.zero_()
                head.bias[7] = 1e4  # every layer, every step: code 7
    with pytest.warns(RuntimeWarning, match="collapsed for batch rows \\[0, 1\\]"):
        codes = generate(model, text_batch(), 4, progress=False)
    assert (codes == 7).all()
    _, info = generate_with_info(tiny_model(), text_batch(), 4, progress=False)
    assert not info.collapsed.any() and info.distinct.shape == (2, 12)


def test_sample_token_matches_closed_forms():
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(40000, 4)
    freq = lambda cfg: torch.bincount(sample_token(logits, cfg, g), minlength=4).float() / 40000  # noqa: E731
    p = torch.softmax(logits[0] / 2.0, -1)
    torch.testing.assert_close(freq(SampleConfig(temperature=2.0)), p, atol=0.01, rtol=0)
    torch.testing.assert_close(freq(SampleConfig(top_k=2)), torch.tensor([0.625, 0.375, 0, 0]), atol=0.01, rtol=0)
    # top_p=0.7: 0.5 < 0.7 so the 0.3 code is kept; 0.8 >= 0.7 so the rest are dropped
    torch.testing.assert_close(freq(SampleConfig(top_p=0.7)), torch.tensor([0.625, 0.375, 0, 0]), atol=0.01, rtol=0)
    torch.testing.assert_close(freq(SampleConfig(top_p=0.4)), torch.tensor([1.0, 0, 0, 0]))
    shuffled = logits[:, [2, 0, 3, 1]]  # top-p must work in the original order, not the sorted one
    torch.testing.assert_close(torch.bincount(sample_token(shuffled, SampleConfig(top_p=0.7), g), minlength=4)
                               .float() / 40000, torch.tensor([0, 0.625, 0, 0.375]), atol=0.01, rtol=0)


def test_bad_sample_config():
    # NaN passed 'temperature < 0' and crashed mid-sampling; inf sampled uniformly without a word
    for kwargs in (dict(temperature=-1), dict(temperature=float("nan")), dict(temperature=float("inf")),
                   dict(top_k=-2), dict(top_p=1.5)):
        with pytest.raises(ConfigError):
            SampleConfig(**kwargs)
    with pytest.raises(ConfigError, match=r"sample.top_k must be in 0..1024 \(0 = off\), got 5000"):
        SampleConfig(top_k=5000)  # above the codebook: off, and recorded on the card as 5000
    with pytest.raises(ConfigError, match="below 0.0001 sampling is argmax .* give 0 for greedy"):
        SampleConfig(temperature=1e-39)  # logits / T overflowed: a torch.multinomial traceback
    with pytest.raises(ValueError, match="n_frames"):
        generate(tiny_model(), text_batch(), 0, progress=False)
