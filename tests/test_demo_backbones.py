"""Demo weights of the metric backbones and CLAP (siren.demo_assets): the file format, a few steps
of each recipe on tiny data, and the committed files through the evaluation's own loaders."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from siren import demo_weights
from siren.data.demo import CLASSES, clip
from siren.demo_assets.data import Split
from siren.errors import CheckpointError, MissingWeightsError
from siren.io import sha256_file


def tiny_split(split: str, classes=(0, 3, 9), per_class: int = 2) -> Split:
    items = [(c, *clip(c, split, k)) for c in classes for k in range(per_class)]
    return Split([w for _, w, _ in items], [cap for _, _, cap in items], np.array([c for c, _, _ in items]),
                 ["original"] * len(items))


# ------------------------------------------------------------------------------------------- format

def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_overlay_round_trip_and_hash_check(tmp_path, fresh_builds):
    base = demo_weights.seeded(3, _mlp)
    trained = {"2.weight": torch.randn(3, 5), "2.bias": torch.randn(3)}
    path = tmp_path / "m.safetensors"
    demo_weights.save(path, base, trained, seed=3, meta={"x": 1})
    net, sha = demo_weights.load(path, _mlp)
    assert sha == sha256_file(path)  # the hash of the bytes the tensors came from
    # the untouched tensors are the seed's, the trained ones the file's
    assert torch.equal(net[0].weight, base[0].weight) and torch.equal(net[2].weight, trained["2.weight"])
    assert demo_weights.header(path)["label"] == "demo weights (trained on the embedded set)"
    # a base that regenerates differently (another init, as another torch version might draw) is refused
    with pytest.raises(CheckpointError, match="builds or draws it otherwise"):
        demo_weights.load(path, lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).apply(
            lambda m: nn.init.zeros_(m.weight) if isinstance(m, nn.Linear) else None))
    with pytest.raises(MissingWeightsError, match="rebuild"):
        demo_weights.load(tmp_path / "absent.safetensors", _mlp)
    # a file cut short, or a trained tensor of another shape: a SafetensorError / RuntimeError traceback
    good = path.read_bytes()
    path.write_bytes(good[:60])
    with pytest.raises(CheckpointError, match=r"m.safetensors: a damaged demo weights file .*restore it"):
        demo_weights.load(path, _mlp)
    path.write_bytes(good[:-8])
    with pytest.raises(CheckpointError, match=r"m.safetensors: a damaged demo weights file"):
        demo_weights.load(path, _mlp)
    demo_weights.save(path, base, {"2.bias": torch.randn(4)}, seed=3, meta={"x": 1})
    with pytest.raises(CheckpointError, match=r"m.safetensors: a damaged demo weights file \(Error\(s\) in loading"):
        demo_weights.load(path, _mlp)


def test_the_same_training_writes_the_same_file_in_any_process(tmp_path):
    # safetensors' own writer put the header's seven metadata keys in another order in each process, so a rebuild
    # of the same tensors gave a file of another sha256 (the hash the cards and embedding caches record)
    import subprocess
    import sys

    code = ("import sys, torch; from torch import nn; from siren import demo_weights\n"
            "mlp = lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))\n"
            "trained = {'2.bias': torch.arange(3.0)}\n"
            "demo_weights.save(sys.argv[1], demo_weights.seeded(3, mlp), trained, seed=3, meta={'x': 1})")
    paths = [tmp_path / f"{i}.safetensors" for i in range(2)]  # 7 keys: two orders agree 1 time in 5040
    for p in paths:
        subprocess.run([sys.executable, "-c", code, str(p)], check=True)
    assert len({sha256_file(p) for p in paths}) == 1


def test_a_file_replaced_after_its_hash_was_recorded_is_refused(tmp_path, fresh_builds, monkeypatch):
    # a backbone hashes its file into its id (cache keys) at __init__ and loads it at first use: a file
    # replaced between them would give features filed under the first file's hash
    path = tmp_path / "m.safetensors"
    demo_weights.save(path, demo_weights.seeded(3, _mlp), {"2.bias": torch.randn(3)}, seed=3, meta={})
    recorded = sha256_file(path)
    demo_weights.save(path, demo_weights.seeded(3, _mlp), {"2.bias": torch.randn(3)}, seed=3, meta={})
    with pytest.raises(CheckpointError, match="changed while this run was using it"):
        demo_weights.load(path, _mlp, recorded)
    monkeypatch.setattr(demo_weights, "_KEPT", None)
    demo_weights.keep_loaded()  # the kept network is checked as well
    demo_weights.load(path, _mlp)
    with pytest.raises(CheckpointError, match="changed while this run was using it"):
        demo_weights.load(path, _mlp, recorded)


def test_a_codec_rebuilt_without_its_backbones_is_named_at_load(tmp_path, caplog, fresh_builds):
    codec = tmp_path / demo_weights.CODEC_FILE
    codec.write_bytes(b"the codec the backbones trained on")
    path = tmp_path / "m.safetensors"
    demo_weights.save(path, demo_weights.seeded(3, _mlp), {"2.bias": torch.randn(3)}, seed=3,
                      meta={"codec_sha256": sha256_file(codec)})
    with caplog.at_level("WARNING", logger="siren.demo_weights"):
        demo_weights.load(path, _mlp)
        assert not caplog.records
        codec.write_bytes(b"a codec rebuilt alone")
        demo_weights.load(path, _mlp)
    assert "another demo codec" in caplog.text and "siren.demo_assets.backbones" in caplog.text


def test_kept_networks_are_copies_of_one_load(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    demo_weights.save(path, demo_weights.seeded(3, _mlp), {"2.bias": torch.randn(3)}, seed=3, meta={})
    monkeypatch.setattr(demo_weights, "_KEPT", None)
    demo_weights.keep_loaded()  # what the warm-start server does before loading the demo networks
    loads = []
    monkeypatch.setattr(demo_weights, "_load",
                        lambda p, make, sha: loads.append(p) or (demo_weights.seeded(3, make), sha256_file(p)))
    (a, _), (b, _) = demo_weights.load(path, _mlp), demo_weights.load(path, _mlp)
    assert len(loads) == 1 and a is not b  # loaded once; each caller owns its copy (a .to(device) stays its own)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a rewritten file (new mtime) is loaded again
    demo_weights.load(path, _mlp)
    assert len(loads) == 2


def test_kept_seeded_builds_are_copies_of_one_build(monkeypatch):
    monkeypatch.setattr(demo_weights, "_KEPT", None)
    demo_weights.keep_loaded()
    builds = []

    def make():
        builds.append(1)
        return _mlp()

    a, b = demo_weights.seeded(3, make, key=("mlp",)), demo_weights.seeded(3, make, key=("mlp",))
    assert len(builds) == 1 and a is not b and all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    c = demo_weights.seeded(4, make, key=("mlp",))  # another seed, another network
    assert len(builds) == 2 and not torch.equal(c[0].weight, a[0].weight)
    demo_weights.seeded(3, make)  # no key: built anew
    assert len(builds) == 3
    with torch.no_grad():
        a[0].weight.zero_()  # a caller's copy is its own
    assert torch.equal(demo_weights.seeded(3, make, key=("mlp",))[0].weight, b[0].weight)


def _nudged(scale: float):
    """``_mlp`` drawn from seed 3 with every weight moved by ``scale`` of itself (seed 3's draw on another CPU)."""
    def make():
        torch.manual_seed(3)
        net = _mlp()
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(1 + scale)
        return net
    return make


def test_an_init_that_differs_only_in_float_rounding_loads(tmp_path, fresh_builds):
    # another CPU's vectorised normal_ moved CLAP's RoBERTa init by <= 5e-8 (values ~0.1): the exact hash differs,
    # the fingerprint holds; a change of 1e-3 of each value is no rounding and is refused
    base = demo_weights.seeded(3, _mlp)
    path = tmp_path / "m.safetensors"
    demo_weights.save(path, base, {"2.bias": torch.randn(3)}, seed=3, meta={})
    net, _ = demo_weights.load(path, _nudged(3e-7))
    assert not torch.equal(net[0].weight, base[0].weight)
    assert torch.allclose(net[0].weight, base[0].weight, rtol=1e-6, atol=0)
    with pytest.raises(CheckpointError, match="first at tensor '0.bias'"):
        demo_weights.load(path, _nudged(1e-3))
    # a region of a tensor changed away from the fingerprint's sampled values: the moments refuse it (the 16
    # sampled values alone let a base with every other value zeroed load)
    def zeroed_between_samples():
        net = demo_weights._seeded(3, _mlp)
        w = net[0].weight.data.view(-1)
        keep = torch.arange(16) * (w.numel() - 1) // 15
        mask = torch.zeros_like(w, dtype=torch.bool)
        mask[keep] = True
        w[~mask] = 0.0
        return net

    with pytest.raises(CheckpointError, match="first at tensor '0.weight'"):
        demo_weights.load(path, zeroed_between_samples)


def test_a_base_with_other_last_bits_is_warned_of_once_per_assets_cache(tmp_path, fresh_builds, monkeypatch, caplog):
    """On a CPU kind other than the builder's, every load of the demo CLAP warned (every job's log); the warning is
    now given once per regenerated base in an assets cache (noted there), then INFO, checked every time."""
    monkeypatch.setenv("SIREN_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.safetensors"
    demo_weights.save(path, demo_weights.seeded(3, _mlp), {"2.bias": torch.randn(3)}, seed=3, meta={})
    levels = []
    for make in (_nudged(3e-7), _nudged(3e-7), _nudged(2e-7)):  # the last: other bits again (another CPU kind)
        caplog.clear()
        with caplog.at_level("INFO", logger="siren.demo_weights"):
            demo_weights.load(path, make)
        levels.append([(r.levelname, "warned of once in this assets cache" in r.getMessage()) for r in caplog.records
                       if "not bit-identical" in r.getMessage()])
    assert levels == [[("WARNING", False)], [("INFO", True)], [("WARNING", False)]]
    with pytest.raises(CheckpointError, match="first at tensor"):  # a base noted as seen is still checked
        demo_weights.load(path, _nudged(1e-3))


# ------------------------------------------------------------------------------------------- recipes

@pytest.fixture(scope="module")
def tiny_data():
    return {"train": tiny_split("train"), "test": tiny_split("test", per_class=1)}


def _check_recipe(trained: dict, make, name: str) -> None:
    """What a recipe commits are tensors of the network (names, shapes) and training moved them.
    (Loading them over the seeded trunk is checked on the committed files below.)"""
    full = demo_weights.seeded(0, make).state_dict()
    assert set(trained) <= set(full)
    assert all(trained[k].shape == full[k].shape for k in trained)
    changed = [k for k in trained if not torch.equal(trained[k].to(full[k].dtype), full[k])]
    assert changed, f"{name}: the recipe left every tensor it commits at its init"


def test_panns_recipe_few_steps(tiny_data):
    from eval.backbones import PANNS_16K, panns_models
    from siren.demo_assets.backbones import build_panns

    trained, meta = build_panns(tiny_data, steps=3, bn_clips=1, batch=4)
    assert all(trained[k].dtype == torch.float16 for k in ("fc1.weight", "fc_audioset.weight"))  # both trained
    assert not torch.allclose(trained["bn0.running_var"], torch.ones(64))  # re-estimated on the clips
    assert set(meta["test_accuracy"]) == {"original"}
    _check_recipe(trained, lambda: panns_models().Cnn14(**PANNS_16K), "panns")


def test_vggish_recipe_few_steps(tiny_data):
    from torchvggish import torchvggish as tv

    from siren.demo_assets.backbones import build_vggish

    trained, meta = build_vggish(tiny_data, steps=3)
    assert set(meta["test_accuracy_nearest_centroid"]) == {"original"}
    assert set(trained) == {"embeddings.4.weight", "embeddings.4.bias"}
    _check_recipe(trained, lambda: tv.VGG(tv.make_layers(), postprocess=False), "vggish")


def test_clap_recipe_few_steps(tiny_data):
    from siren.demo_assets.clap_heads import build_clap, make_base

    trained, meta = build_clap(tiny_data, steps=3, per_class=2)
    assert {k.split(".")[0] for k in trained} == {"audio_projection", "text_projection", "audio_branch"}
    # fitted and measured in every view: both resamplers (the stage-2 reward's and the CLAP metric's), the
    # demo models' 1 s clip length, a 44.1 kHz PCM16 file
    assert set(meta["test"]) == {f"original/{v}" for v in ("torchaudio", "librosa", "first_1s", "pcm16_44k")}
    assert 0 <= meta["test"]["original/librosa"]["audio_to_text_top1_class"] <= 1
    _check_recipe(trained, make_base, "clap")


def test_fit_draws_its_dropout_from_its_seed_alone():
    # Cnn14's recipe applies dropout in its loss; it once drew from whatever state the process's generator was
    # in (after the codec's build in `demo_assets train`), so `python -m siren.demo_assets.backbones` alone
    # gave another PANNs file than the full rebuild on the same machine
    from siren.demo_assets.fit import fit

    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 3
    runs = []
    for before in (1, 2):  # what ran before: other draws from the global generator
        torch.manual_seed(before)
        state = torch.get_rng_state()
        net = demo_weights.seeded(0, lambda: nn.Linear(8, 3))
        fit(list(net.parameters()), lambda b: nn.functional.cross_entropy(net(nn.functional.dropout(x[b], 0.5)),
                                                                          y[b]), 32, steps=5, seed=7, batch=8)
        assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left as it was
        runs.append(net.weight.detach().clone())
    assert torch.equal(*runs)


def test_audioset_targets_are_distinct_named_classes():
    from siren.demo_assets.backbones import AUDIOSET, audioset_names, audioset_targets

    names, idx = audioset_names(), audioset_targets()
    assert len(set(idx.tolist())) == len(CLASSES) == len(AUDIOSET)
    assert [names[i] for i in idx] == [AUDIOSET[c.name] for c in CLASSES]


@pytest.mark.parametrize("arg, match", [("only=frob", r"unknown \['frob'\]"), ("only=fd,", r"unknown \[''\]"),
                                        ("per_half=0", "per_half must be > 0"), ("per_half=11", "at most 10"),
                                        ("codec=/nonexistent.pth", "codec=/nonexistent.pth: no such file")])
def test_check_command_refuses_what_it_would_not_measure(arg, match):
    """``only=frob`` measured none of fd, fad and clap and said nothing: it is refused, by key, before any work."""
    from siren.config import load_config
    from siren.demo_assets.check import CheckConfig
    from siren.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(CheckConfig, [arg])


def test_a_rebuild_writes_the_same_file_and_a_bad_out_is_refused_before_training(tmp_path):
    """The builder wrote its wall and CPU seconds into the file's header: the same tensors rebuilt were another
    file (another sha256: every demo cell's id and embedding-cache key). And out= (a file, for the backbones; a
    folder, for the codec) failed at the write, after the training: now when the keys are read."""
    from siren.config import load_config
    from siren.demo_assets.backbones import BuildConfig, build
    from siren.demo_assets.codec import CodecRecipe
    from siren.errors import ConfigError

    args = dict(only="vggish", codec="none", n_train=1, n_test=1, vggish_steps=2, threads=1)
    reports = [build(BuildConfig(out=str(tmp_path / d), **args)) for d in ("a", "b")]
    name = demo_weights.DEMO_FILES["vggish"]
    assert sha256_file(tmp_path / "a" / name) == sha256_file(tmp_path / "b" / name)
    assert "seconds" in reports[0]["vggish"] and "seconds" not in demo_weights.header(tmp_path / "a" / name)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"out=.*afile: .*afile is a file, not a folder"):
        load_config(BuildConfig, [f"out={tmp_path / 'afile'}", "codec=none"])
    with pytest.raises(ConfigError, match=r"out=.*a is a folder; give the path of the DAC file"):
        load_config(CodecRecipe, [f"out={tmp_path / 'a'}"])
    with pytest.raises(ConfigError, match=r"afile is a file, not a folder"):
        load_config(CodecRecipe, [f"out={tmp_path / 'afile' / 'c.pth'}"])


# ------------------------------------------------------------------------------------------- committed files

@pytest.fixture(scope="module")
def held_out():
    """One unseen test clip of each of 6 classes (the recipes never train on the test split)."""
    return tiny_split("test", classes=(0, 2, 4, 7, 10, 13), per_class=1)


def _clips(d: Split):
    from eval.audio import make_clip

    return [make_clip(str(i), w, 16000) for i, w in enumerate(d.wavs)]


@pytest.mark.parametrize("asset", sorted(demo_weights.DEMO_FILES))
def test_committed_files_are_demo_overlays(asset):
    from siren.codec import DEMO_FILE

    head = demo_weights.header(demo_weights.demo_file(asset))
    assert head["label"] == demo_weights.LABEL and len(head["base_sha256"]) == 64
    # every tensor of the seeded base has its moments, for the check where the exact hash differs (another CPU)
    assert set(json.loads(head["base_moments"])) == set(json.loads(head["base_fingerprint"]))
    # trained on the committed codec's resynthesis (by content): a codec rebuilt without its backbones fails here
    assert json.loads(head["meta"])["codec_sha256"] == sha256_file(DEMO_FILE)


def test_committed_panns_recognises_held_out_clips(held_out):
    from eval.backbones import PannsCnn14
    from siren.demo_assets.backbones import audioset_targets

    bb = PannsCnn14(weights="demo")
    out = bb.embed_batch([bb.prepare(c) for c in _clips(held_out)])
    logits = np.stack([o["logits"] for o in out])
    assert logits.shape == (len(held_out), 527) and bb.card()["weights_note"] == demo_weights.LABEL
    hits = logits.argmax(1) == audioset_targets()[held_out.labels]
    assert hits.sum() >= 4, f"demo PANNs: {hits.sum()}/6 held-out clips on their AudioSet class"


def test_committed_vggish_separates_classes(held_out):
    from eval.backbones import VGGish

    bb = VGGish(weights="demo")
    emb = np.stack([o["frames"].mean(0) for o in bb.embed_batch([bb.prepare(c) for c in _clips(held_out)])])
    # clips of different classes lie far apart relative to the embedding's own scale: a second clip of
    # class 0 lies nearer the first than clips of the other classes do
    other = tiny_split("test", classes=(0,), per_class=2)
    again = bb.embed_batch([bb.prepare(_clips(other)[1])])[0]["frames"].mean(0)
    d = np.linalg.norm(emb - again, axis=1)
    assert d.argmin() == 0, f"distances to the 6 classes: {np.round(d, 2)}"
    # audio unlike the demo clips keeps embeddings of the same order (per-feature input scaling once gave 1e10)
    from eval.audio import make_clip

    noise = np.random.default_rng(0).standard_normal(24000).astype(np.float32) * 0.3
    far = bb.embed_batch([bb.prepare(make_clip("noise", noise, 16000))])[0]["frames"]
    assert np.linalg.norm(far, axis=1).max() < 100 * np.linalg.norm(emb, axis=1).max()


def test_committed_clap_matches_audio_to_its_caption(held_out):
    from siren.clap import Clap, ClapConfig
    from siren.text import TextConfig, TextEncoder

    clap = Clap(ClapConfig(weights="demo"))
    assert clap.weights_label == "demo" and clap.card()["weights_note"] == demo_weights.LABEL
    cos = (clap.embed_audio([torch.from_numpy(w) for w in held_out.wavs]) @ clap.embed_text(held_out.captions).T)
    assert cos.diag().mean() > cos[~torch.eye(len(cos), dtype=bool)].mean() + 0.1
    # the text encoder that conditions the models runs on the same demo CLAP
    states = TextEncoder(TextConfig(weights="demo"), clap=clap).encode(held_out.captions[:2])
    assert states.states.shape[-1] == 768 and torch.allclose(states.pooled, clap.embed_text(held_out.captions[:2]))


def test_committed_clap_gives_the_metric_the_caption_signal_the_reward_gets(held_out):
    """The stage-2 reward hands CLAP 16 kHz audio (``Clap.embed_audio`` resamples it with torchaudio); the CLAP
    metric resamples as laion_clap reads files (librosa). Heads fitted on the first path alone kept about half
    their caption signal through the second (matched cosine 0.27 against 0.52 on the 90 test clips)."""
    from eval.backbones import ClapAudio

    bb = ClapAudio(weights="demo")
    assert bb.resampler == "librosa"
    text = torch.from_numpy(bb.embed_text(held_out.captions))
    metric = torch.from_numpy(np.stack([o["audio"] for o in bb.embed_batch([bb.prepare(c) for c in _clips(held_out)])]))
    reward = bb.net.embed_audio([torch.from_numpy(w) for w in held_out.wavs])
    off = ~torch.eye(len(text), dtype=bool)

    def caption_gap(audio):
        cos = audio @ text.T
        return float(cos.diag().mean() - cos[off].mean())

    assert caption_gap(reward) > 0.2
    assert caption_gap(metric) > 0.8 * caption_gap(reward), (caption_gap(metric), caption_gap(reward))


def test_committed_clap_scores_a_44k_pcm16_file_as_the_16k_one(held_out):
    """A 16 kHz clip written as a 44.1 kHz PCM16 file fills the band above 8 kHz with quantisation noise; heads
    fitted on 16 kHz audio alone moved each clip's matched cosine by 0.074 on average on these clips (0.03-0.12;
    -4.5 points of CLAP score on the 90 test clips). Fitted on that view too, a clip scores about the same."""
    from eval.backbones import ClapAudio
    from siren.demo_assets.clap_heads import view

    bb = ClapAudio(weights="demo")
    text = torch.from_numpy(bb.embed_text(held_out.captions))

    def matched(how):
        audio = np.stack([o["audio"] for o in bb.embed_batch([torch.from_numpy(view(how, w)) for w in held_out.wavs])])
        return (torch.from_numpy(audio) * text).sum(1)

    moved = (matched("pcm16_44k") - matched("librosa")).abs()
    assert float(moved.mean()) < 0.04, moved


def test_check_command_measures_signal_with_the_committed_files(caplog, recwarn):
    """`python -m siren.demo_assets.check`'s measurements, on a few clips: real vs real sets closer than real vs
    noise in FD and FAD, and CLAP higher for a clip's own caption than for other classes' captions."""
    from eval.metrics import FewSamplesWarning
    from siren.demo_assets.check import measure

    with caplog.at_level("INFO", logger="siren.demo_assets.check"):
        out = measure({"train": tiny_split("train", per_class=2), "test": tiny_split("test", per_class=4)}, per_half=1)
    # Frechet distances of 3 clips: one log line per metric, not four raw warning blocks
    assert not [w for w in recwarn if issubclass(w.category, FewSamplesWarning)]
    assert "FD from 3 samples of 2048-d embeddings a set: biased" in caplog.text
    assert out["label"] == demo_weights.LABEL and out["clips_per_set"] == 3
    for name in ("fd", "fad"):
        assert 0 < out[name]["real_vs_real"] < out[name]["real_vs_noise"] / 3, (name, out[name])
    clap = out["clap_test_original"]
    assert clap["clap_score_matched"] > clap["clap_score_other_class"] + 10
    assert 1 <= out["isc_test_original"][0] <= 3  # at most the 3 classes drawn
