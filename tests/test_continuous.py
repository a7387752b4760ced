"""The continuous-token LM of paper/003: config, latent projection vs sklearn's PCA and the real DAC path,
diffusion head against closed forms (Gaussian posterior oracle, a learned 2-D mixture), causality,
KV-cached == uncached sampling, and exactly what MNTP masks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis import continuous_recon as recon
from siren.config import load_config
from siren.errors import CheckpointError, ConfigError
from siren.model.continuous import ContinuousConfig, ContinuousLM, DiffusionHead, LatentProjection, presets
from siren.model.continuous import latent as lat
from siren.model.continuous.params import table
from tests.fixtures_model import demo_codec, text_batch


def tiny(*overrides: str) -> ContinuousConfig:
    return load_config(ContinuousConfig, ["scale=cont-tiny", *overrides], presets())


def tiny_lm(*overrides: str, seed: int = 0) -> ContinuousLM:
    """A tiny LM whose zero-initialised head layers are randomised, so samples depend on the backbone."""
    torch.manual_seed(seed)
    model = ContinuousLM(tiny(*overrides))
    with torch.no_grad():
        for m in [*(b.ada[-1] for b in model.head.blocks), model.head.final_ada[-1], model.head.out]:
            m.weight.normal_(0, 0.3)
    return model.eval()


def token_batch(B=2, T=9, k=8, seed=0, lengths=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    text, text_mask = text_batch(B)
    frame_mask = torch.ones(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths or []):
        frame_mask[b, n:] = False
    return {"latents": torch.randn(B, T, k, generator=g), "frame_mask": frame_mask, "text": text,
            "text_mask": text_mask}


# ---- config and sizes ---------------------------------------------------------------------------

@pytest.mark.parametrize("arg, match", [("prediction=score", "eps, v, x0"), ("schedule=sigmoid", "cosine, linear"),
                                        ("sample_steps=2000", "exceeds"),
                                        ("mask_ratio=1.0", r"continuous\.mask_ratio must be in \[0, 1\)"),
                                        ("attn_heads=3", "divisible"),
                                        # a beta of 1 (T = 20) or more made abar 0 or negative: NaN samples
                                        ("schedule=linear train_steps=20 sample_steps=10", "train_steps > 20")])
def test_config_rejects_bad_values(arg, match):
    with pytest.raises(ConfigError, match=match):
        tiny(*arg.split())


@pytest.mark.parametrize("scale, size", [("cont-base", 193e6), ("cont-large", 462e6)])
def test_presets_match_the_paper_sizes_within_one_percent(scale, size):
    out = table(load_config(ContinuousConfig, [f"scale={scale}"], presets()), [f"scale={scale}"])
    total = int(out.split("model total: ")[1].split(" ")[0].replace(",", ""))
    assert abs(total - size) / size < 0.01 and "relative difference" in out


def test_params_command_covers_the_continuous_family(capsys):
    from siren.model import params

    params.main(["family=continuous", "scale=cont-large"])
    out = capsys.readouterr().out
    assert "family=continuous" in out and "paper (abstract: Large): 462.0M" in out


# ---- latent projection ----------------------------------------------------------------------------

def test_projection_matches_sklearn_pca_and_full_dim_is_lossless(tmp_path):
    from sklearn.decomposition import PCA

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(1024, 1024, generator=g) * torch.logspace(0, -3, 1024)  # decaying spectrum
    z = [(torch.randn(2, 40, 1024, generator=g) @ mix.T + 3.0).transpose(1, 2) for _ in range(3)]  # [2, 1024, 40]
    X = torch.cat([x.transpose(1, 2).reshape(-1, 1024) for x in z]).double().numpy()
    for k in (16, 128):
        proj = LatentProjection.fit(z, k, whiten=False)
        ref = PCA(k, svd_solver="full").fit(X)
        got = proj.decode(proj.encode(z[0])).transpose(1, 2).reshape(-1, 1024).double().numpy()
        want = ref.inverse_transform(ref.transform(z[0].transpose(1, 2).reshape(-1, 1024).double().numpy()))
        np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max())
        assert proj.explained == pytest.approx(ref.explained_variance_ratio_.sum(), rel=1e-6)
    full = LatentProjection.fit(z, 1024)  # whitened, every axis: an invertible map
    tokens = full.encode(z[1])
    torch.testing.assert_close(full.decode(tokens), z[1], atol=1e-3, rtol=1e-4)
    t = torch.cat([full.encode(x).reshape(-1, 1024) for x in z])  # all 240 training frames: rank 239
    torch.testing.assert_close(t[:, :200].std(0), torch.ones(200), atol=1e-3, rtol=0)  # whitened axes
    full.save(tmp_path / "p.safetensors", "codec-x")
    back = LatentProjection.load(tmp_path / "p.safetensors")
    assert back.id == full.id and torch.equal(back.basis, full.basis) and torch.equal(back.scale, full.scale)
    with pytest.raises(CheckpointError, match="does not exist"):
        LatentProjection.load(tmp_path / "missing.safetensors")


def test_latent_path_agrees_with_the_codec_rvq_path():
    """The pre-quantization latent, quantized with 12 layers, is what Codec.encode/decode use (demo DAC)."""
    dac = demo_codec()
    wav = 0.3 * torch.randn(1, 1600, generator=torch.Generator().manual_seed(0))
    z = lat.dac_latent(dac, wav)
    assert z.shape == (1, 1024, 5)
    codes = dac.encode(wav)
    zq, _, _ = dac.dac.quantizer.from_codes(codes)
    torch.testing.assert_close(lat.rvq_latent(dac, z), zq, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lat.decode_latent(dac, zq), dac.decode(codes), atol=1e-5, rtol=1e-4)
    assert recon.fvu([z[0]], [z[0]]) == 0.0 and recon.fvu([lat.rvq_latent(dac, z)[0]], [z[0]]) > 0
    # the clips' own mean explains nothing (FVU 1), whatever mean the projection was fitted with
    other = lat.dac_latent(dac, 0.3 * torch.randn(1, 3200, generator=torch.Generator().manual_seed(1)))[0]
    mean = torch.cat([z[0], other], 1).mean(1, keepdim=True)
    assert recon.fvu([mean.expand_as(z[0]), mean.expand_as(other)], [z[0], other]) == pytest.approx(1.0, rel=1e-9)


def test_reconstruction_report_orders_the_candidates():
    """Full-rank PCA is lossless, a 4-dim one is not; the RVQ's error is measured on the same footing."""
    dac = demo_codec()
    g = torch.Generator().manual_seed(1)
    train = [0.3 * torch.randn(3200, generator=g) for _ in range(3)]  # 30 frames: the fit sees rank <= 29
    rows = {r.name: r for r in recon.reconstruction(dac, train, train[:1], [4, 1024])}
    assert list(rows) == ["latent-1024", "RVQ-12", "PCA-4", "PCA-1024"]
    assert rows["latent-1024"].latent_fvu == 0 and rows["latent-1024"].snr_db > 100
    assert rows["PCA-1024"].latent_fvu < 1e-6 and rows["PCA-4"].latent_fvu > 100 * rows["PCA-1024"].latent_fvu
    assert 0 < rows["RVQ-12"].latent_fvu and rows["RVQ-12"].snr_db < rows["PCA-1024"].snr_db


# ---- diffusion head ------------------------------------------------------------------------------

MU, S = torch.tensor([1.5, -0.5, 0.0]), torch.tensor([0.4, 1.0, 2.0])


class GaussianOracle(DiffusionHead):
    """The exact prediction for data x0 ~ N(MU, diag S^2): E[x0 | x_t] in closed form, stated as eps, v or x0."""

    def forward(self, x_t, t, z):
        a = self.abar[t][:, None]
        x0 = MU + a.sqrt() * S ** 2 / (a * S ** 2 + 1 - a) * (x_t - a.sqrt() * MU)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.prediction]


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_sampler_with_exact_predictions_recovers_the_gaussian(schedule, prediction):
    """Full 1000-step ancestral chain: mean within 4 standard errors, std within 4% (n = 4000)."""
    head = GaussianOracle(3, 1, 8, 1, schedule=schedule, prediction=prediction)
    n = 4000
    x = head.sample(torch.zeros(n, 1), 1000, 1.0, torch.Generator().manual_seed(0))
    assert ((x.mean(0) - MU).abs() < 4 * S / n ** 0.5).all(), x.mean(0)
    assert ((x.std(0) / S - 1).abs() < 0.04).all(), x.std(0)
    cold = head.sample(torch.zeros(n, 1), 1000, 0.5, torch.Generator().manual_seed(0))
    assert (cold.std(0) < 0.8 * x.std(0)).all()  # temperature narrows the samples


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_loss_of_the_exact_predictor_is_the_bayes_risk(prediction):
    """For Gaussian data each target's posterior variance is closed-form: Var(x0 | x_t) = S^2 (1-a) / (a S^2 + 1-a),
    Var(eps | x_t) = a/(1-a) of it, Var(v | x_t) = 1/(1-a) of it (v = sqrt(a) x_t / sqrt(1-a) - x0 / sqrt(1-a)),
    so the loss of the exact predictor is their mean over t and dims."""
    head = GaussianOracle(3, 1, 8, 1, schedule="cosine", prediction=prediction)
    g = torch.Generator().manual_seed(0)
    n = 60000
    x0 = MU + S * torch.randn(n, 3, generator=g)
    got = head.loss(x0, torch.zeros(n, 1), g).mean().item()
    a = head.abar.double()[:, None]
    var_x0 = S.double() ** 2 * (1 - a) / (a * S.double() ** 2 + 1 - a)
    want = {"x0": var_x0, "eps": a / (1 - a) * var_x0, "v": var_x0 / (1 - a)}[prediction].mean().item()
    assert got == pytest.approx(want, rel=0.05)


MIXTURES = {  # condition -> (weights, means [3, 2]); component std 0.3
    0: (torch.tensor([0.5, 0.3, 0.2]), torch.tensor([[-2.0, -1.0], [2.0, 1.0], [0.0, 2.5]])),
    1: (torch.tensor([0.2, 0.2, 0.6]), torch.tensor([[2.0, -2.0], [-2.0, 2.0], [0.0, -0.5]])),
}


def draw(c: int, n: int, g: torch.Generator) -> torch.Tensor:
    w, means = MIXTURES[c]
    return means[torch.multinomial(w, n, replacement=True, generator=g)] + 0.3 * torch.randn(n, 2, generator=g)


def test_head_learns_a_conditional_2d_mixture():
    """The default head (v, cosine). Tolerances: component weights +-0.05, means +-0.15, stds within 25% of 0.3,
    for each condition; the held-out loss (fixed t and noise) falls below 0.8 of its value at initialisation."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    head = DiffusionHead(2, 2, 64, 2, schedule="cosine", prediction="v")
    cond = torch.eye(2).repeat_interleave(256, 0)  # one-hot condition, 256 rows each
    held = torch.cat([draw(0, 256, g), draw(1, 256, g)])

    def held_out_loss():
        with torch.no_grad():
            return head.loss(held, cond, torch.Generator().manual_seed(7)).mean().item()  # the same t and noise

    before = held_out_loss()
    steps = 600
    opt = torch.optim.AdamW(head.parameters(), 5e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 5e-3, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        loss = head.loss(torch.cat([draw(0, 256, g), draw(1, 256, g)]), cond, g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert held_out_loss() < 0.8 * before
    for c, (w, means) in MIXTURES.items():
        x = head.sample(torch.eye(2)[c].expand(2000, 2), 50, 1.0, torch.Generator().manual_seed(1 + c))
        k = torch.cdist(x, means).argmin(1)
        for j in range(3):
            sel = x[k == j]
            assert abs(len(sel) / len(x) - w[j]) < 0.05, (c, j, len(sel) / len(x))
            assert (sel.mean(0) - means[j]).abs().max() < 0.15, (c, j, sel.mean(0))
            assert ((sel.std(0) / 0.3 - 1).abs() < 0.25).all(), (c, j, sel.std(0))


# ---- backbone causality and sampling -------------------------------------------------------------

@pytest.mark.parametrize("mntp", [False, True])
def test_backbone_does_not_see_future_tokens(mntp):
    model = tiny_lm(f"mntp={str(mntp).lower()}")
    b = token_batch()
    masked = model.mntp_mask(b["frame_mask"], torch.Generator().manual_seed(0)) if mntp else None
    h = model.hidden(b["latents"], b["text"], b["text_mask"], masked)
    for k in (0, 4, 8):
        future = b["latents"].clone()
        future[:, k:] += 5.0 * torch.randn_like(future[:, k:])
        h2 = model.hidden(future, b["text"], b["text_mask"], masked)
        assert torch.equal(h[:, : k + 1], h2[:, : k + 1])  # z_t reads tokens < t: z_0..z_k unchanged
        if k + 1 < h.shape[1]:
            assert not torch.allclose(h[:, k + 1:], h2[:, k + 1:])  # ... and later steps do see the change


def test_kv_cached_sampling_equals_uncached_for_a_fixed_seed():
    model = tiny_lm()
    text, mask = text_batch(2)
    a = model.generate(text, mask, 7, steps=8, seed=3)
    b = model.generate(text, mask, 7, steps=8, seed=3, cached=False)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, model.generate(text, mask, 7, steps=8, seed=4))  # the seed matters
    assert not torch.allclose(a, model.generate(text.flip(0), mask, 7, steps=8, seed=3))  # the text matters
    assert model.decode(a).shape == (2, 1024, 7)


def test_loss_trains_the_tiny_model_on_one_batch():
    torch.manual_seed(0)
    model = ContinuousLM(tiny("mntp=true")).train()
    b = token_batch(lengths=[9, 6])
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        out = model.loss(b, g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert out.frames == 15 and out.masked == 2 + 2  # floor(0.3 * 8 + 1/2) + floor(0.3 * 5 + 1/2)
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])


def test_audio_to_tokens_to_audio_through_the_model(tmp_path):
    """The whole model-side path on the demo DAC: wav -> latent -> fitted projection (saved, reloaded) ->
    teacher-forced loss -> generate -> inverse projection -> DAC decoder -> wav."""
    dac = demo_codec()
    g = torch.Generator().manual_seed(2)
    wavs = [0.3 * torch.randn(3200, generator=g) for _ in range(2)]
    LatentProjection.fit([lat.dac_latent(dac, w) for w in wavs], 8).save(tmp_path / "p.safetensors", dac.id)
    proj = LatentProjection.load(tmp_path / "p.safetensors")
    torch.manual_seed(0)
    model = ContinuousLM(tiny(f"latent={proj.id}"), proj)
    tokens = proj.encode(torch.cat([lat.dac_latent(dac, w) for w in wavs]))  # [2, 10, 8]
    text, text_mask = text_batch(2)
    batch = {"latents": tokens, "frame_mask": torch.ones(2, 10, dtype=torch.bool), "text": text, "text_mask": text_mask}
    assert torch.isfinite(model.loss(batch).loss)
    wav = lat.decode_latent(dac, model.decode(model.generate(text, text_mask, 4, steps=5)))
    assert wav.shape == (2, 4 * 320) and torch.isfinite(wav).all()
    with pytest.raises(ConfigError, match="another projection"):
        ContinuousLM(tiny("latent=pca8-w-n999"), proj)


# ---- MNTP ---------------------------------------------------------------------------------------

def test_mntp_masks_exactly_the_documented_inputs():
    model = tiny_lm("mntp=true", "mask_ratio=0.25")
    b = token_batch(B=3, T=12, lengths=[12, 7, 1])
    m = model.mntp_mask(b["frame_mask"], torch.Generator().manual_seed(0))
    # real inputs: positions 1..n-1 (x_0..x_{n-2}); counts floor(0.25 * (n - 1) + 1/2) for n = 12, 7, 1
    assert m.sum(1).tolist() == [3, 2, 0]
    assert not m[:, 0].any() and not m[1, 7:].any()  # never sos, never an input beyond the valid frames
    x = model.inputs(b["latents"], m)
    ref = model.inputs(b["latents"])
    assert torch.equal(x[m], model.mask.expand(int(m.sum()), -1))
    assert torch.equal(x[~m], ref[~m]) and torch.equal(ref[:, 0], model.backbone.sos.expand(3, -1))
    torch.testing.assert_close(ref[:, 1:], model.inp(b["latents"][:, :-1]))
    # uniform over the 11 real inputs of row 0: each masked with frequency 3/11
    frames = torch.ones(2000, 12, dtype=torch.bool)
    freq = model.mntp_mask(frames, torch.Generator().manual_seed(1)).float().mean(0)
    assert freq[0] == 0 and ((freq[1:] - 3 / 11).abs() < 0.04).all(), freq
    # training mode only, and only with mntp=true
    model.train()
    assert model.loss(b, torch.Generator().manual_seed(0)).masked == 5
    model.eval()
    assert model.loss(b).masked == 0
    assert tiny_lm().train().loss(b).masked == 0
