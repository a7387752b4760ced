"""The demo codec (weights=demo): its recipe's stages on tiny data, and the committed file through the loader."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from siren.codec import CODEBOOK_DIM, CODEBOOK_SIZE, DEMO_FILE, DEMO_LABEL, N_LAYERS, Codec, CodecConfig, load_dac
from siren.demo_assets import codec as recipe
from siren.demo_assets import rvq_fit
from siren.errors import CheckpointError, ConfigError, DataError
from siren.io import load_torch_file, sha256_file
from tests.fixtures_model import codec as random_codec


def _tiny_dac():
    import dac

    torch.manual_seed(0)
    return dac.DAC(**recipe.DEMO_KWARGS)


def _in_proj(q) -> torch.Tensor:
    """A quantizer's in-projection matrix [8, 1024] as its module computes it (weight norm folded in)."""
    with torch.no_grad():
        eye = torch.eye(1024)[None]  # 1024 one-hot frames
        return (q.in_proj(eye) - q.in_proj(torch.zeros_like(eye)))[0]


def _low_rank_latents(n: int = 2048, rank: int = 200, seed: int = 0) -> list[torch.Tensor]:
    """Latents [1024, n] with a decaying spectrum over ``rank`` directions, split in two 'clips'."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(1024, rank, generator=g))[0]
    z = basis @ (torch.randn(rank, n, generator=g) * torch.logspace(0, -1.5, rank)[:, None]) + 0.3
    return [z[:, : n // 2], z[:, n // 2:]]


def test_spherical_kmeans_uses_every_code_under_dacs_lookup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 8, generator=g) * torch.linspace(2, 0.2, 8)
    codes = rvq_fit.spherical_kmeans(x, 256, iters=5, gen=g)
    # DAC's own lookup (cosine on l2-normalised vectors) is the judge of which code a point takes
    from dac.nn.quantize import VectorQuantize

    vq = VectorQuantize(8, 256, 8)
    vq.codebook.weight.data.copy_(codes)
    _, idx = vq.decode_latents(x.T[None])
    assert idx.unique().numel() == 256
    with pytest.raises(DataError, match="training frames"):
        rvq_fit.spherical_kmeans(x[:100], 256, iters=1, gen=g)


def test_fit_quantizers_takes_the_residuals_principal_directions():
    model = _tiny_dac()
    latents = _low_rank_latents()
    stats = rvq_fit.fit_quantizers(model, latents, 3, torch.Generator().manual_seed(0))
    z = torch.cat(latents, 1)
    # layer 1 codes the top-8 principal subspace of the centred latents (numpy's SVD as the reference)
    u = np.linalg.svd((z - z.mean(1, keepdim=True)).double().numpy(), full_matrices=False)[0][:, :CODEBOOK_DIM]
    q1 = model.quantizer.quantizers[0]
    w_in = _in_proj(q1).double()
    assert torch.allclose(w_in @ w_in.T, torch.eye(8, dtype=torch.float64), atol=1e-4)
    assert np.allclose(np.abs(np.linalg.svd(u.T @ w_in.T.numpy())[1]), 1, atol=1e-3)  # same subspace
    # DAC's own RVQ forward on these latents: every code of every layer used, error falling with depth
    model.eval()
    with torch.no_grad():
        errors = [float((model.quantizer(z[None], n_quantizers=r)[0] - z).pow(2).mean()) for r in (1, 4, 12)]
        _, codes, *_ = model.quantizer(z[None])
    assert all(codes[0, j].unique().numel() == CODEBOOK_SIZE for j in range(N_LAYERS))
    assert errors[0] > errors[1] > errors[2]
    assert [s["codes_used"] for s in stats] == [CODEBOOK_SIZE] * N_LAYERS


def test_stage_1_warms_its_rate_up_then_anneals_it():
    """From its full rate at step 0, stage 1 sat on a loss plateau near 0.8 for three quarters of the
    stage on one machine (docs/demo/codec.md): the rate rises over ``ae_warmup`` steps, then the cosine."""
    def rates(**keys) -> list[float]:
        cfg = recipe.CodecRecipe(ae_steps=100, **keys)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.ae_lr)
        sched, out = recipe.autoencoder_schedule(opt, cfg), []
        for _ in range(cfg.ae_steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    lr, warm = recipe.CodecRecipe().ae_lr, rates(ae_warmup=10)
    assert warm[0] == pytest.approx(lr / 10) and warm[:10] == sorted(warm[:10]) and warm[9] > 0.95 * lr
    assert warm[10:] == sorted(warm[10:], reverse=True) and warm[-1] < 1e-3 * lr
    assert rates(ae_warmup=0)[0] == pytest.approx(lr)  # 0: the plain cosine, as before the warmup


# The smallest recipe that still stops and resumes inside every stage (3 steps > checkpoint_every = 2),
# built once here: the end-to-end, stage-4 and resume tests below all start from this one build.
TINY = dict(n_train=1, n_test=1, segment_s=0.1, batch=2, ae_steps=4, ft_steps=4, decay_steps=4, kmeans_iters=1,
            threads=1, checkpoint_every=2, fp16=False)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """(the recipe, the report, the file) of one uninterrupted tiny build."""
    folder = tmp_path_factory.mktemp("codec_recipe")
    cfg = recipe.CodecRecipe(**TINY, data=str(folder / "src"), out=str(folder / "straight.pth"))
    return cfg, recipe.build(cfg), Path(cfg.out)


def test_recipe_end_to_end_tiny(straight, tmp_path, monkeypatch):
    """A few steps of every stage on the smallest demo set; the file loads through the codec loader."""
    cfg, report, out = straight
    init = _tiny_dac().state_dict()  # build() starts from the same seeded init
    assert report["n_clips"] == 15
    assert all(np.isfinite([report["ae_loss_end"], report["ft_loss_end"], report["decay_loss_end"]]))
    codec = Codec(CodecConfig(weights=str(out)))
    # every recipe build marks its file demo, but only the committed demo codec is labelled as the demo weights:
    # a smoke build's few steps are not what the demo tables were made with
    assert codec.weights_label == f"file {out.resolve()}"
    # nor is a file of other widths than the published DAC's called pretrained for being at its place in the cache
    import shutil

    from siren import assets

    monkeypatch.setenv("SIREN_CACHE", str(tmp_path / "cache"))
    dest = assets.path("dac_16khz")
    dest.parent.mkdir(parents=True)
    shutil.copy(out, dest)
    assert Codec(CodecConfig(weights="pretrained")).weights_label == f"file {dest.resolve()}"
    moved = {k.split(".")[0] for k, v in codec.dac.state_dict().items() if not torch.equal(v, init[k])}
    assert moved == {"encoder", "quantizer", "decoder"}
    w_in = _in_proj(codec.dac.quantizer.quantizers[5])
    assert torch.allclose(w_in @ w_in.T, torch.eye(8), atol=1e-4)  # stage 2 wrote principal directions
    codes = codec.encode(torch.randn(3200) * 0.1)
    assert codes.shape == (1, N_LAYERS, 10) and codec.decode(codes).shape == (1, 3200)

    # init=: stages 3-4 alone keep the file's encoder and quantizers and record where they came from; with
    # the same recipe they give the same bits (a build from scratch runs them on its stored stage-2 file)
    for ft_steps, moved in ((cfg.ft_steps, set()), (cfg.ft_steps + 1, {"decoder"})):
        again = tmp_path / "stage3.pth"
        recipe.build(recipe.CodecRecipe(**{**cfg.__dict__, "out": str(again), "init": str(out), "ft_steps": ft_steps}))
        before, after = (torch.load(f, weights_only=True) for f in (out, again))
        changed = {k.split(".")[0] for k, v in after["state_dict"].items()
                   if not torch.equal(v, before["state_dict"][k])}
        assert changed == moved
    assert after["metadata"]["init_from"]["sha256"] == sha256_file(out)
    assert after["metadata"]["init_from"]["stages_kept"] == [1, 2]
    assert after["metadata"]["init_from"]["recipe"]["ae_steps"] == cfg.ae_steps


def test_a_build_on_init_leaves_a_from_scratch_builds_work_alone(straight, tmp_path):
    """Both kept their stages in <out>.build/, and a build with init= removed it when it ended: a from-scratch
    build stopped in stage 3 to the same out= lost its stages 1-3 (about an hour on a CPU)."""
    cfg, _, out = straight
    target = tmp_path / "codec.pth"
    scratch = tmp_path / "codec.pth.build"
    scratch.mkdir()
    (scratch / "stage2.pth").write_bytes(b"a stopped build's stage 2")
    recipe.build(recipe.CodecRecipe(**{**cfg.__dict__, "out": str(target), "init": str(out),
                                       "data": str(tmp_path / "s"), "decay_steps": 0}))
    assert target.is_file() and (scratch / "stage2.pth").read_bytes() == b"a stopped build's stage 2"
    assert not (tmp_path / "codec.pth.build-init").exists()  # its own work folder, removed when done


def test_stage_4_alone_on_a_stored_file_equals_stage_4_after_stage_3(straight, tmp_path):
    """The codec committed until 2026-12-05 ran stage 4 on a stored stage-3 file (init_stage=3); one run of
    stages 3-4 must give the same bits, or a build split into runs would not be the recipe's. Stored in fp16, as
    the committed files are."""
    cfg, _, s12 = straight  # its encoder and quantizers (stages 1-2)
    base = {**cfg.__dict__, "data": str(tmp_path / "src"), "ft_steps": 3, "fp16": True}
    paths = {k: tmp_path / f"{k}.pth" for k in ("s3", "s4", "s34")}
    init = dict(base, init=str(s12))
    recipe.build(recipe.CodecRecipe(**{**init, "out": str(paths["s3"]), "decay_steps": 0}))  # stage 3 only
    recipe.build(recipe.CodecRecipe(**{**init, "init": str(paths["s3"]), "init_stage": 3, "out": str(paths["s4"]),
                                       "decay_steps": 3}))
    recipe.build(recipe.CodecRecipe(**{**init, "out": str(paths["s34"]), "decay_steps": 3}))  # stages 3, 4 in one run
    s3, s4, s34 = (torch.load(paths[k], weights_only=True)["state_dict"] for k in ("s3", "s4", "s34"))
    assert not torch.equal(s3["decoder.model.0.bias"], s4["decoder.model.0.bias"])  # stage 4 trained
    assert all(torch.equal(s4[k], s34[k]) for k in s34)
    chain = torch.load(paths["s4"], weights_only=True)["metadata"]["init_from"]
    assert chain["stages_kept"] == [1, 2, 3] and chain["init_from"]["sha256"] == sha256_file(s12)


def test_a_stopped_build_resumes_to_the_same_bits(straight, tmp_path, monkeypatch, caplog):
    """Stopped in stage 1, then in stage 3, then in stage 4 (as Ctrl-C or a preemption would), the same
    command resumes each time from the last checkpoint or stage file and ends with the bits of a run that
    was never stopped; the work folder is gone once the file is written."""
    from siren.demo_assets.resume import work_dir

    cfg, _, straight_file = straight
    base = {**cfg.__dict__, "data": str(tmp_path / "src")}
    base.pop("out")
    out = tmp_path / "stopped.pth"
    update = recipe._update

    def stop_at(n):  # the n-th optimiser step of this run raises, as a signal arriving mid-step would
        calls = iter(range(1, 10**6))
        monkeypatch.setattr(recipe, "_update", lambda *a: update(*a) if next(calls) < n else
                            (_ for _ in ()).throw(KeyboardInterrupt))

    work = work_dir(out)
    caplog.set_level("INFO")
    # stage 1 step 3; then (resumed at step 2) stage 3 step 3; then stage 4 step 3
    for n, left in ((3, {"stage1.ckpt"}), (5, {"stage1.ckpt", "stage2.pth", "stage3.ckpt"}),
                    (5, {"stage1.ckpt", "stage2.pth", "stage3.ckpt", "stage3.pth", "stage4.ckpt"})):
        stop_at(n)
        with pytest.raises(KeyboardInterrupt):
            recipe.build(recipe.CodecRecipe(**base, out=str(out)))
        assert {f.name for f in work.iterdir()} == left and not out.exists()
    monkeypatch.setattr(recipe, "_update", update)
    recipe.build(recipe.CodecRecipe(**base, out=str(out)))
    assert all(f"stage {k}: resumed at step 2" in caplog.text for k in (1, 3, 4))
    assert "stage 2: kept" in caplog.text and "stage 3: kept" in caplog.text
    a, b = (torch.load(f, weights_only=True) for f in (straight_file, out))
    assert a["metadata"] == b["metadata"] and a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert not work.exists()


def test_another_recipes_stage_file_or_checkpoint_is_redone_not_used(tmp_path, caplog):
    from siren.demo_assets.resume import Checkpoint, finished, stage_key

    cfg = recipe.CodecRecipe(ae_steps=4)
    path = recipe.save(_tiny_dac(), tmp_path / "stage2.pth", cfg, True, build_key=stage_key(cfg, 2))
    assert finished(path, stage_key(cfg, 2))
    other = stage_key(recipe.CodecRecipe(ae_steps=5), 2)
    with caplog.at_level("WARNING"):
        assert not finished(path, other)
    assert "stage2.pth was written by another recipe" in caplog.text and "'ae_steps': 5" in caplog.text
    # nor is a stage written on another machine kind kept (its CPU's kernels train the same seed to other bits)
    elsewhere = {**stage_key(cfg, 2), "machine": {"torch": "2.13.0+cpu", "cpu": "AMD EPYC, family 23 model 1"}}
    assert stage_key(cfg, 2)["machine"] != elsewhere["machine"] and not finished(path, elsewhere)
    model = _tiny_dac()
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    gen = torch.Generator()
    Checkpoint(tmp_path / "s1.ckpt", stage_key(cfg, 1), 2).save(2, model, opt, sched, gen, [1.0, 0.5])
    assert Checkpoint(tmp_path / "s1.ckpt", stage_key(cfg, 1), 2).restore(model, opt, sched, gen) == (2, [1.0, 0.5])
    assert Checkpoint(tmp_path / "s1.ckpt", stage_key(recipe.CodecRecipe(ae_steps=5), 1), 2).restore(
        model, opt, sched, gen) == (0, [])
    assert "another recipe's checkpoint" in caplog.text
    # cut short by a host crash (written atomically, not durably): a torch traceback; now redone with a warning
    path.write_bytes(path.read_bytes()[:100])
    (tmp_path / "s1.ckpt").write_bytes(b"")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert not finished(path, stage_key(cfg, 2))
        assert Checkpoint(tmp_path / "s1.ckpt", stage_key(cfg, 1), 2).restore(model, opt, sched, gen) == (0, [])
    assert "stage2.pth: not a readable torch file" in caplog.text and "redoing the stage" in caplog.text
    assert "s1.ckpt: not a readable torch file" in caplog.text and "the stage starts afresh" in caplog.text


def test_the_machine_kind_names_an_apple_cpu_without_proc_cpuinfo(monkeypatch):
    """Without /proc/cpuinfo the build's machine kind was platform.processor(): "arm" on every Apple Silicon Mac,
    so a build stopped on an M1 resumed on an M3 and mixed their kernels' bits. macOS names its CPU to sysctl."""
    import subprocess

    from siren.demo_assets import resume

    real_read = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(FileNotFoundError(self))
                        if str(self) == "/proc/cpuinfo" else real_read(self, *a, **k))
    real_run = subprocess.run

    def sysctl(argv, **kwargs):  # platform.processor() runs `uname -p`: the real one
        if argv[0] != "sysctl":
            return real_run(argv, **kwargs)
        assert argv == ["sysctl", "-n", "machdep.cpu.brand_string"]
        return subprocess.CompletedProcess(argv, 0, stdout="Apple M3 Pro\n")

    monkeypatch.setattr(subprocess, "run", sysctl)
    assert resume.machine()["cpu"] == "Apple M3 Pro"


def test_stage_3_refuses_an_init_file_with_other_encoder_widths(tmp_path):
    import dac

    kw = {**recipe.DEMO_KWARGS, "encoder_dim": 8}
    path = tmp_path / "narrow.pth"
    torch.save({"state_dict": dac.DAC(**kw).state_dict(), "metadata": {"kwargs": kw}}, path)
    with pytest.raises(recipe.ConfigError, match="init=.*narrow.pth.*widths"):
        recipe.load_init(path, 2)
    # named when the recipe is read: the build hashed it after making the demo clips, a FileNotFoundError
    with pytest.raises(recipe.ConfigError, match="init=.*missing.pth: no such file"):
        recipe.CodecRecipe(init=str(tmp_path / "missing.pth"))
    with pytest.raises(recipe.ConfigError, match="init_stage=4"):
        recipe.CodecRecipe(init_stage=4)
    with pytest.raises(recipe.ConfigError, match="nothing would train"):
        recipe.CodecRecipe(init=str(path), init_stage=3, decay_steps=0)


def test_loader_rejects_a_file_with_another_quantizer(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {}, "metadata": {"kwargs": {**recipe.DEMO_KWARGS, "codebook_size": 512}}}, bad)
    with pytest.raises(CheckpointError, match="codebook_size"):
        load_dac(bad)
    torch.save({"metadata": {}}, bad)
    with pytest.raises(CheckpointError, match="state_dict"):
        load_dac(bad)


# The committed file's tests; until a build meets the properties below the file is not committed.
needs_file = pytest.mark.skipif(not DEMO_FILE.is_file(), reason=f"{DEMO_FILE} not built: python -m "
                                "siren.demo_assets.codec")


@pytest.fixture(scope="module")
def demo_codec():
    return Codec(CodecConfig(weights="demo"))


def _test_clip(k: int = 0) -> torch.Tensor:
    from siren.data.demo import CLASSES, clip

    return torch.from_numpy(clip(k % len(CLASSES), "test", k // len(CLASSES))[0])


@needs_file
def test_committed_demo_codec_loads_with_the_papers_quantizer(demo_codec):
    ckpt = torch.load(DEMO_FILE, map_location="cpu", weights_only=True)
    kw = ckpt["metadata"]["kwargs"]
    assert (kw["n_codebooks"], kw["codebook_size"], kw["codebook_dim"], kw["sample_rate"]) == (12, 1024, 8, 16000)
    assert int(np.prod(kw["encoder_rates"])) == 320 and kw["latent_dim"] == 1024
    assert DEMO_FILE.stat().st_size < 12 * 2**20
    assert demo_codec.weights_label == DEMO_LABEL and "pretrained" not in demo_codec.weights_label
    t = demo_codec.code_tables()
    assert t.codebooks.shape == (12, 1024, 8) and t.out_weight.shape == (12, 1024, 8)


@needs_file
def test_committed_demo_codec_is_the_recipes_own_output():
    """The committed file is what `python -m siren.demo_assets train` builds: it records today's default recipe
    and no earlier file its stages came from. A recipe default changed without a rebuild fails here."""
    meta = load_torch_file(DEMO_FILE)["metadata"]
    assert meta["recipe"] == recipe.recorded_recipe(recipe.CodecRecipe()), (
        "the committed demo codec was built by another recipe: rebuild it (python -m siren.demo_assets train) "
        "and rerun the demo tables")
    assert "init_from" not in meta


@needs_file
def test_demo_codec_reconstructs_better_than_random_and_better_with_depth(demo_codec):
    """Mel L1 of the round trip on 3 test clips (dog bark, clapping, water drip): the random codec
    measured 2.4-3.2 on them, a first demo build 0.7-1.0."""
    from analysis.orthogonality import cosine_matrix
    from analysis.prepared import pooled_features
    from analysis.rvq_depth import decode_depths, mel_l1

    demo, rand, depth, codes_all = [], [], [], []
    for k in (0, 7, 11):
        x = _test_clip(k)
        n = len(x) // 320 * 320
        codes = demo_codec.encode(x)
        codes_all.append(codes[0])
        demo.append(mel_l1(x[:n], demo_codec.decode(codes)[0, :n]))
        rand.append(mel_l1(x[:n], random_codec().decode(random_codec().encode(x))[0, :n]))
        depth.append([mel_l1(x[:n], w[:n]) for w in decode_depths(demo_codec, codes[0], [1, 4, 12])])
    assert np.mean(demo) < np.mean(rand) - 1.0
    r1, r4, r12 = np.mean(depth, 0)
    assert r1 > r4 > r12, f"reconstruction does not improve with r: mel L1 {r1:.3f}, {r4:.3f}, {r12:.3f}"
    cos = cosine_matrix(pooled_features(demo_codec, codes_all))  # Fig. 2a: layers' features near-orthogonal
    assert np.abs(cos[:, ~np.eye(N_LAYERS, dtype=bool)]).mean() < 0.3


def test_recipe_refuses_negative_steps_and_rates():
    with pytest.raises(ConfigError, match="ft_steps must be >= 0, got -1"):
        recipe.CodecRecipe(ft_steps=-1)
    with pytest.raises(ConfigError, match="ae_warmup must be >= 0, got -5"):
        recipe.CodecRecipe(ae_warmup=-5)
    with pytest.raises(ConfigError, match="ae_lr must be > 0"):
        recipe.CodecRecipe(ae_lr=0.0)


def test_train_command_routes_each_part_its_keys_and_checks_both_before_training(monkeypatch, tmp_path):
    """`python -m siren.demo_assets train codec.K=V backbones.K=V`: every key reaches its builder (none is
    dropped), the backbones train on the codec just built, and a bad key of either part stops it at once."""
    from siren.demo_assets import __main__ as train_all
    from siren.demo_assets import backbones

    calls = []
    monkeypatch.setattr(recipe, "run", lambda cfg: calls.append(("codec", cfg)))
    monkeypatch.setattr(backbones, "main", lambda argv: calls.append(("backbones", argv)) or 0)
    assert train_all.main(["train", "codec.out=/tmp/c.pth", "codec.ft_steps=5", "backbones.panns_steps=1"]) == 0
    (part, cfg), backbone_call = calls
    assert part == "codec" and cfg.out == "/tmp/c.pth" and cfg.ft_steps == 5 and cfg.ae_steps == 2400
    assert backbone_call == ("backbones", ["codec=/tmp/c.pth", "out=/tmp", "panns_steps=1"])  # beside the codec
    calls.clear()
    train_all.main(["train", "codec.out=/tmp/c.pth", "backbones.out=/tmp/b"])
    assert calls[-1] == ("backbones", ["codec=/tmp/c.pth", "out=/tmp/b"])
    # backbones.codec= trains them on another codec: it was added after the built one's codec= (a key given twice,
    # an error once given_once came, after the hour of the codec's build)
    other = tmp_path / "other.pth"
    other.write_bytes(b"")
    train_all.main(["train", "codec.out=/tmp/c.pth", f"backbones.codec={other}"])
    assert calls[-1] == ("backbones", ["out=/tmp", f"codec={other}"])
    from siren.config import load_config

    assert load_config(backbones.BuildConfig, calls[-1][1]).codec == str(other)
    calls.clear()
    for args, words in ((["ft_steps=5"], "codec.KEY=VALUE or backbones.KEY=VALUE"),
                        (["codec.ft_steps=-1"], "codec.* keys: ft_steps must be >= 0"),
                        (["codec.ft_steps=5", "backbones.nope=1"], "backbones.* keys: unknown config key 'nope'"),
                        ([], "usage: python -m siren.demo_assets train")):
        with pytest.raises(ConfigError, match=words):
            train_all.main(["rebuild", *args] if words.startswith("usage") else ["train", *args])
    assert calls == []  # nothing was built


def test_a_codec_file_replaced_while_a_process_runs_is_loaded_again(tmp_path, monkeypatch):
    """The codec was cached per (weights, seed, device) for the process: a warm-start server kept the demo codec
    it preloaded for every job it forked, whatever the file became. Its file's version is in the key now."""
    import shutil

    import siren.codec as C
    from siren.frontends import build_codec

    f = tmp_path / "dac16k_demo.pth"
    shutil.copy(C.DEMO_FILE, f)
    monkeypatch.setattr(C, "DEMO_FILE", f)
    first = build_codec(C.CodecConfig(weights="demo"))
    assert build_codec(C.CodecConfig(weights="demo")) is first  # unchanged: the same object
    os.utime(f, ns=(1, 1))  # put in place again
    assert build_codec(C.CodecConfig(weights="demo")) is not first
