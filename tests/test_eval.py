"""Backbones, embedding cache, protocol card and `eval/audiocaps.py gen_dir=` end to end (random weights)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from eval import card as cards
from eval.audio import BadAudioError, make_clip
from eval.audiocaps import EvalError, evaluate, main
from eval.backbones import PannsCnn14, VGGish
from eval.config import EvalConfig
from siren.config import ConfigError, load_config
from siren.errors import ManifestError
from siren.io import sha256_file
from tests.fixtures_eval import make_reference, synth, write_set
from tests.fixtures_model import demo_codec
from tests.helpers import overridden, run_as_main

ROOT = Path(__file__).resolve().parents[1]
CLAP = "clap" if (ROOT / "siren" / "clap.py").is_file() else ""
METRICS = ",".join(["fad", "fd", "isc", "kl"] + ([CLAP] if CLAP else []))


@pytest.fixture(scope="module")
def panns():
    return PannsCnn14("random", seed=0)


@pytest.fixture(scope="module")
def vggish():
    return VGGish("random", seed=0)


def test_panns_logits_are_the_pre_sigmoid_outputs_of_panns_own_forward(panns):
    x = torch.from_numpy(np.stack([synth(1, 2.5), synth(2, 2.5)]))
    ours = panns.forward(x)
    with torch.no_grad():
        theirs = panns.net(x)  # panns_inference's Cnn14.forward: sigmoid outputs
        by_layer = panns.net.fc_audioset(ours["embedding"])  # logits recomputed from the embedding
    assert ours["logits"].shape == (2, 527) and ours["embedding"].shape == (2, 2048)
    torch.testing.assert_close(torch.sigmoid(ours["logits"]), theirs["clipwise_output"], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["logits"], by_layer, rtol=1e-5, atol=1e-6)
    assert "panns_inference" not in sys.modules  # the package (its import runs wget) was never imported


def test_panns_batched_equals_one_at_a_time_and_resamples(panns):
    clips = [make_clip(f"c{i}", synth(i, 3.0, 22050), 22050) for i in range(3)]
    xs = [panns.prepare(c) for c in clips]
    assert xs[0].shape == (48000,)  # 3 s at 16 kHz
    batched = panns.embed_batch(xs)
    for x, b in zip(xs, batched):
        single = panns.embed_batch([x])[0]
        np.testing.assert_allclose(b["logits"], single["logits"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(b["embedding"], single["embedding"], rtol=1e-4, atol=1e-7)
    short = panns.prepare(make_clip("s", synth(0, 0.5), 16000))
    assert short.shape == (PannsCnn14.MIN_SAMPLES,)  # audioldm_eval pads clips under 2 s


def test_embed_clips_groups_lengths_and_computes_duplicates_once(panns):
    from eval.cache import embed_clips

    wavs = [synth(1, 2.5), synth(2, 3.0), synth(3, 2.5), synth(1, 2.5)]  # two lengths; clip 3 repeats clip 0
    clips = [make_clip(f"c{i}", w, 16000) for i, w in enumerate(wavs)]
    out, stats = embed_clips(panns, clips, cache=None, batch_size=2)
    assert stats.computed == 3 and stats.hits == 0
    for c, o in zip(clips, out):
        single = panns.embed_batch([panns.prepare(c)])[0]
        np.testing.assert_allclose(o["logits"], single["logits"], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(out[0]["embedding"], out[3]["embedding"])


def test_each_batch_is_prepared_as_it_goes(vggish, panns, monkeypatch):
    """Every input of an evaluation set (PANNs' 640 kB per 10 s clip, CLAP's 1.9 MB at 48 kHz) was prepared before
    the first batch ran; now a batch runs as soon as it is full, with the batches and results of before: VGGish
    batches every clip together, PANNs the clips of one prepared shape."""
    from eval.cache import embed_clips

    for net, seconds, order in ((vggish, [1.5, 2, 2.5, 3, 3.5], "ppeppepe"),
                                (panns, [2.5, 3, 2.5, 3, 2.5], "pppepepe")):
        clips = [make_clip(f"c{i}", synth(i, s), 16000) for i, s in enumerate(seconds)]
        calls = []
        prepare, embed_batch = net.prepare, net.embed_batch
        monkeypatch.setattr(net, "prepare", lambda c: (calls.append("p"), prepare(c))[1])
        monkeypatch.setattr(net, "embed_batch", lambda xs: (calls.append("e"), embed_batch(xs))[1])
        out, _ = embed_clips(net, clips, cache=None, batch_size=2)
        assert "".join(calls) == order
        batches = [[0, 1], [2, 3], [4]] if net is vggish else [[0, 2], [1, 3], [4]]  # as when all were prepared first
        for batch in batches:
            for i, o in zip(batch, embed_batch([prepare(clips[i]) for i in batch])):
                for name in net.outputs:
                    np.testing.assert_array_equal(out[i][name], o[name])


def test_an_evaluation_of_few_clips_logs_one_frechet_warning_and_records_each(panns, vggish, caplog):
    # four log lines per demo evaluation before (FD and FAD, each set); results.json keeps each message
    from eval.audiocaps import evaluate_sets

    gen = [make_clip(f"c{i}", synth(i, 2.0), 16000) for i in range(3)]
    ref = [make_clip(f"c{i}", synth(i + 7, 2.0), 16000) for i in range(3)]
    cfg = EvalConfig(weights="random", metrics="fd,fad", cache=False)
    with caplog.at_level("WARNING", logger="eval.audiocaps"):
        out = evaluate_sets(gen, ref, ["a", "b", "c"], cfg, models={"fd_kl_is": panns, "fad": vggish})
    lines = [r.getMessage() for r in caplog.records if "Frechet" in r.getMessage()]
    assert len(lines) == 1 and "FD, generated: 3 x 2048-d" in lines[0] and "FAD, reference: 6 x 128-d" in lines[0]
    assert len(out["warnings"]) == 4 and all("compare only numbers" in w for w in out["warnings"])


def test_clips_read_from_files_hold_no_samples_and_a_file_changed_meanwhile_is_named(panns, tmp_path):
    """An evaluation held every clip's samples from reading to its end (6-20 GB at 4.9k clips); now each network's
    pass reads the file again, checked against the hash taken when the evaluation began, with the same results."""
    from eval.audio import load_clips
    from eval.cache import embed_clips

    wavs = {f"c{i}": synth(i, 2.5) for i in range(3)}
    paths = {}
    for id_, wav in wavs.items():
        sf.write(paths.setdefault(id_, tmp_path / f"{id_}.wav"), wav, 16000, subtype="FLOAT")
    clips = load_clips(paths)
    assert all(c.samples is None for c in clips)
    from_files, _ = embed_clips(panns, clips, cache=None, batch_size=2)
    held, _ = embed_clips(panns, [make_clip(i, w, 16000) for i, w in wavs.items()], cache=None, batch_size=2)
    for a, b in zip(from_files, held):
        np.testing.assert_array_equal(a["embedding"], b["embedding"])
    sf.write(paths["c1"], 0.5 * wavs["c1"], 16000, subtype="FLOAT")  # rewritten after the evaluation read it
    with pytest.raises(BadAudioError, match=r"c1\.wav \(id c1\) changed while it was evaluated: run the evaluation "
                                            r"again"):
        embed_clips(panns, clips, cache=None, batch_size=2)
    paths["c2"].unlink()
    with pytest.raises(BadAudioError, match=r"c2\.wav \(id c2\) cannot be read again \(.*\); it was read when"):
        clips[2].wav


def test_random_weights_are_seeded(fresh_builds):
    a, b = PannsCnn14("random", seed=3), PannsCnn14("random", seed=4)
    wa, wb = a.net.fc1.weight, b.net.fc1.weight
    assert torch.equal(wa, PannsCnn14("random", seed=3).net.fc1.weight) and not torch.equal(wa, wb)
    assert a.weights_sha256 == "random-seed3" and a.id != b.id
    # the id once kept 16 characters of "random-seed<k>": seeds 123456 and 123457 shared cached embeddings
    assert PannsCnn14("random", seed=123456).id != PannsCnn14("random", seed=123457).id


def test_vggish_is_torchvggish_without_pca_and_final_relu(vggish):
    from torchvggish import torchvggish as tv
    from torchvggish import vggish_input

    wav = synth(7, 2.9)
    frames = vggish.embed_batch([vggish.prepare(make_clip("v", wav, 16000))])[0]["frames"]
    assert frames.shape == (3, 128) and (frames < 0).any()  # 3 whole 0.96 s examples; no ReLU on the output
    # torchvggish's own pipeline with the same weights: examples -> VGG (postprocess=False) -> pre-ReLU output
    ref = tv.VGG(tv.make_layers(), postprocess=False)
    state = {k: v for k, v in vggish.net.state_dict().items()}
    ref.load_state_dict(state)
    ref.eval()
    with torch.no_grad():
        ex = vggish_input.waveform_to_examples(wav.astype(np.float64), 16000, return_tensor=True)
        full = ref(ex)  # with the final ReLU
        pre = ref.embeddings[:-1](torch.flatten(ref.features(ex).permute(0, 2, 3, 1), 1))
    np.testing.assert_allclose(frames, pre.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.maximum(frames, 0), full.numpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# End to end: the CLI on a small generated folder and reference manifest.

@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    manifest, ids = make_reference(root / "ref", n=4, seconds=2.5, captions_per_id=2)
    write_set(root / "gen", ids, seed=2, seconds=3.0, sr=22050)  # another system's rate and length
    return root, manifest, ids


def _args(root, manifest, gen="gen", out="out", *extra):
    return overridden([f"gen_dir={root / gen}", f"ref={manifest}", "weights=random", f"out={root / out}",
                       f"cache_dir={root / 'cache'}", "is_splits=2", f"metrics={METRICS}"], extra)


@pytest.fixture(scope="module")
def cli_run(sets):
    """`python eval/audiocaps.py ...` as the README runs it: the script file executed as ``__main__`` (runpy), in
    this process, so it shares the imports and the kept random networks (a fresh interpreter spent ~30 s of a
    2-core CPU on those alone). Returns (its stdout, results.json)."""
    root, manifest, _ = sets
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIREN_CACHE", str(root / "siren_cache"))
        mp.chdir(root)
        code, stdout, stderr = run_as_main(str(ROOT / "eval" / "audiocaps.py"), *_args(root, manifest))
    assert code == 0, stdout + stderr
    return stdout, json.loads((root / "out" / "results.json").read_text())


def test_cli_writes_results_and_prints_flagged_row(cli_run, sets):
    stdout, results = cli_run
    m = results["metrics"]
    for k in METRICS.split(","):
        assert isinstance(m[k], float) and np.isfinite(m[k]), k
    assert m["fd"] >= 0 and m["fad"] >= 0 and m["isc"] >= 1 - 1e-9
    assert len(results["per_clip"]["kl"]) == 4 and results["per_clip"]["id"] == sets[2]
    assert cards.RANDOM_BANNER in stdout
    assert "| FAD | FD | ISC | KL | CLAP |" in stdout


def test_card_is_complete_and_flags_random_weights(cli_run, sets):
    card = cli_run[1]["card"]
    assert card["WARNING"] == cards.RANDOM_BANNER and card["weights"] == "random"
    for field in cards.REQUIRED:
        assert field in card, field
    for role in ["fd_kl_is", "fad"] + (["clap"] if CLAP else []):
        bb = card["backbones"][role]
        for field in ("id", "weights", "weights_sha256", "sample_rate", "resampler"):
            assert bb[field] not in (None, ""), (role, field)
        assert bb["weights_sha256"] == "random-seed0"
    fd = card["backbones"]["fd_kl_is"]
    assert (fd["sample_rate"], fd["window_size"], fd["hop_size"], fd["mel_bins"], fd["fmin"], fd["fmax"],
            fd["classes_num"]) == (16000, 512, 160, 64, 50, 8000, 527)
    fad = card["backbones"]["fad"]
    assert fad["pca"] is False and fad["final_relu"] is False
    assert card["metrics"]["kl"]["direction"] == "KL(ref||gen)"
    assert (card["metrics"]["isc"]["splits"], card["metrics"]["isc"]["shuffle_seed"]) == (2, 2020)
    assert card["metrics"]["clap"]["checkpoint"] == ("random-seed0" if CLAP else "not computed")
    ref = card["reference"]
    assert ref["caption_index"] == 0 and ref["n_clips"] == 4 and len(ref["set_sha256"]) == 64
    assert len(ref["manifest_sha256"]) == 64 and card["n_clips"] == 4
    audio = card["audio"]  # defaults: each metric's reference code
    assert audio["crop"] == "whole" and audio["channel"]["fd_kl_is"] == "first" and audio["channel"]["fad"] == "mean"
    assert audio["resampler"]["fd_kl_is"].startswith("torchaudio") and audio["resampler"]["fad"].startswith("resampy")
    assert card["metrics"]["fad"]["short_clips"] == "vggish_short=skip"
    assert {"kl", "kl_gen_ref", "kl_sigmoid", "kl_sigmoid_gen_ref"} <= set(cli_run[1]["metrics"])
    assert card["versions"]["torch"] == torch.__version__.split("+")[0] or card["versions"]["torch"].startswith(
        torch.__version__.split("+")[0])
    assert card["code_version"] and card["code_version"] != "unknown"


def test_cache_second_run_computes_nothing_and_a_changed_file_exactly_one(cli_run, sets, capsys):
    root, manifest, ids = sets
    cfg_args = _args(root, manifest, "gen", "out2")
    assert main(cfg_args) == 0
    again = json.loads((root / "out2" / "results.json").read_text())
    assert all(s["computed"] == 0 for s in again["cache"].values()), again["cache"]
    first = {k: v for k, v in cli_run[1]["metrics"].items() if v is not None}
    assert {k: again["metrics"][k] for k in first} == pytest.approx(first, rel=1e-12)

    gen2 = root / "gen_changed"
    write_set(gen2, ids, seed=2, seconds=3.0, sr=22050)  # same content as gen ...
    sf.write(gen2 / f"{ids[1]}.wav", synth(999, 3.0, 22050), 22050)  # ... but one clip
    assert main(_args(root, manifest, "gen_changed", "out3", "metrics=kl")) == 0  # PANNs only: quicker
    changed = json.loads((root / "out3" / "results.json").read_text())
    assert changed["cache"]["fd_kl_is"] == {"hits": 7, "computed": 1}

    assert main(_args(root, manifest, "gen", "out4", "seed=1", "metrics=fad")) == 0
    other_seed = json.loads((root / "out4" / "results.json").read_text())
    assert other_seed["cache"]["fad"] == {"hits": 0, "computed": 8}
    assert other_seed["card"]["backbones"]["fad"]["weights_sha256"] == "random-seed1"

    entry = next((root / "cache" / "vggish-random-seed1").rglob("*.safetensors"))
    entry.write_bytes(entry.read_bytes()[:40])  # a torn / corrupt entry is recomputed, never trusted
    with pytest.warns(UserWarning, match="unreadable"):
        assert main(_args(root, manifest, "gen", "out5", "seed=1", "metrics=fad")) == 0
    assert json.loads((root / "out5" / "results.json").read_text())["cache"]["fad"] == {"hits": 7, "computed": 1}
    assert cards.RANDOM_BANNER in capsys.readouterr().out


def test_embeddings_computed_on_another_device_type_are_not_reused():
    from eval.cache import EmbeddingCache

    keys = {dev: EmbeddingCache.key("content", b.id, b.weights_sha256, b.protocol())
            for dev, b in (("cpu", VGGish("random")), ("cuda", VGGish("random", device="cuda")))}  # not built here
    assert keys["cpu"] != keys["cuda"]


def test_a_subset_is_evaluated_from_a_folder_generated_for_the_whole_set(cli_run, sets):
    # AudioLDM's 964 of AudioCaps' 975 test clips: the folder holds all of them, subset= names the ones scored
    # (the other files were an "extra" error whose advice was the subset= already given)
    root, manifest, ids = sets
    subset = root / "subset.txt"
    subset.write_text("\n".join(ids[:2]) + "\n")
    assert main(_args(root, manifest, "gen", "out_subset", f"subset={subset}", "metrics=fd")) == 0
    card = json.loads((root / "out_subset" / "results.json").read_text())["card"]
    assert card["n_clips"] == 2 and card["reference"]["subset_sha256"] == sha256_file(subset)
    assert card["generated"]["left_out"].startswith(f"{len(ids) - 2} clip(s) of ")
    assert main(_args(root, manifest, "gen", "out_all", "metrics=fd")) == 0  # without subset= nothing is left out
    assert "left_out" not in json.loads((root / "out_all" / "results.json").read_text())["card"]["generated"]


def test_an_upgraded_library_computes_embeddings_afresh(cli_run, sets, monkeypatch):
    # the cache key holds the versions of the code that computed an entry: another resampy or torchvggish
    # can give other last bits, which a reused entry would mix into the new version's numbers
    import importlib.metadata

    import eval.backbones

    root, manifest, _ = sets
    assert main(_args(root, manifest, "gen", "out_same", "metrics=fad")) == 0
    assert json.loads((root / "out_same" / "results.json").read_text())["cache"]["fad"]["computed"] == 0
    real = importlib.metadata.version
    monkeypatch.setattr(eval.backbones.importlib.metadata, "version",
                        lambda d: "99.0" if d == "torchvggish" else real(d))
    assert main(_args(root, manifest, "gen", "out_upgraded", "metrics=fad")) == 0
    results = json.loads((root / "out_upgraded" / "results.json").read_text())
    assert results["cache"]["fad"] == {"hits": 0, "computed": 8}
    assert results["card"]["backbones"]["fad"]["versions"]["torchvggish"] == "99.0"


def test_identical_folders_give_zero_distances_and_kl(cli_run, sets):
    root, manifest, ids = sets
    cfg = EvalConfig(gen_dir=str(root / "ref" / "audio"), ref=str(manifest), weights="random",
                     out=str(root / "self"), cache_dir=str(root / "cache"), is_splits=2, metrics="fad,fd,kl")
    m = evaluate(cfg)["metrics"]
    assert m["fd"] == pytest.approx(0.0, abs=1e-9) and m["fad"] == pytest.approx(0.0, abs=1e-9)
    assert abs(m["kl"]) <= 527 * 1e-6  # zero up to audioldm_eval's eps
    assert cli_run[1]["metrics"]["fd"] > 1e3 * max(m["fd"], 1e-12)


def test_a_run_that_fails_once_begun_sets_the_earlier_results_aside(sets, tmp_path):
    root, manifest, ids = sets
    write_set(tmp_path, ids, seed=5)
    (tmp_path / f"{ids[0]}.wav").write_bytes(b"not audio" * 100)  # found when read, after the run began
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text('{"metrics": {"kl": 1.0}}')  # an earlier evaluation's
    with pytest.raises(BadAudioError, match=rf"{ids[0]}\.wav"):
        evaluate(EvalConfig(gen_dir=str(tmp_path), ref=str(manifest), weights="random", metrics="kl",
                            out=str(tmp_path / "out")))
    assert not (tmp_path / "out" / "results.json").exists()  # never read as this run's
    assert (tmp_path / "out" / "results.previous.json").read_text() == '{"metrics": {"kl": 1.0}}'


def test_mismatched_ids_are_listed(sets, tmp_path):
    root, manifest, ids = sets
    write_set(tmp_path, ids[1:] + ["stranger"], seed=5)
    cfg = EvalConfig(gen_dir=str(tmp_path), ref=str(manifest), weights="random", metrics="kl",
                     out=str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text('{"metrics": {"kl": 1.0}}')  # an earlier evaluation's
    (tmp_path / f"._{ids[1]}.wav").write_bytes(b"\0")  # macOS's AppleDouble file: hidden, not a clip (glob's rule)
    with pytest.raises(ManifestError) as e:
        evaluate(cfg)
    # named before anything is written: the earlier results are where they were (a run that fails once it has
    # begun sets them aside as results.previous.json, so they are never read as its own)
    assert (tmp_path / "out" / "results.json").read_text() == '{"metrics": {"kl": 1.0}}'
    assert not (tmp_path / "out" / "results.previous.json").exists()
    assert f"missing 1: {ids[0]}" in str(e.value) and "extra 1 (not in the reference set): stranger" in str(e.value)
    # the missing clip under another case or format is named (it was "missing" only)
    (tmp_path / "stranger.wav").rename(tmp_path / f"{ids[0].upper()}.WAV")
    with pytest.raises(ManifestError, match=rf"under other names there: {ids[0].upper()}\.WAV"):
        evaluate(cfg)
    # a folder or a pipe named <id>.wav: one error, not a libsndfile message or a read that never returns
    import os

    (tmp_path / f"{ids[0].upper()}.WAV").unlink()
    (tmp_path / f"{ids[0]}.wav").mkdir()
    os.mkfifo(tmp_path / f"{ids[1]}.wav.tmp")
    os.replace(tmp_path / f"{ids[1]}.wav.tmp", tmp_path / f"{ids[1]}.wav")
    with pytest.raises(ManifestError, match=rf"2 \.wav name\(s\) that are not files .*{ids[0]}\.wav, {ids[1]}\.wav"):
        evaluate(cfg)


def test_bad_wavs_are_all_named_in_one_error(sets, tmp_path):
    root, manifest, ids = sets
    write_set(tmp_path, ids, seed=6)
    sf.write(tmp_path / f"{ids[0]}.wav", np.zeros(0, np.float32), 16000)
    nan = synth(1)
    nan[100] = np.nan
    sf.write(tmp_path / f"{ids[2]}.wav", nan, 16000, subtype="FLOAT")
    (tmp_path / f"{ids[3]}.wav").write_bytes(b"not a wav file")
    with pytest.raises(BadAudioError) as e:
        evaluate(EvalConfig(gen_dir=str(tmp_path), ref=str(manifest), weights="random", metrics="kl"))
    msg = str(e.value)
    assert "3 of 4 generated files" in msg
    for i in (0, 2, 3):
        assert f"{ids[i]}.wav" in msg
    assert "empty" in msg and "NaN" in msg and f"{ids[1]}.wav" not in msg


def test_too_few_clips_and_bad_config_are_errors(sets, tmp_path, capsys):
    root, manifest, ids = sets
    one = tmp_path / "one.csv"
    one.write_text(f"id,audio,caption\n{ids[0]},{root / 'ref' / 'audio' / ids[0]}.wav,a tone\n")
    write_set(tmp_path / "g", ids[:1], seed=3)
    assert main([f"gen_dir={tmp_path / 'g'}", f"ref={one}", "weights=random"]) == 2
    assert "at least 2 are needed" in capsys.readouterr().err
    assert main([f"gen_dir={root / 'gen'}", f"ref={manifest}", "weigths=random"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'weigths'" in err and "weights" in err and "gen_dir" in err
    with pytest.raises(ConfigError, match=r"metrics='fd,isk': unknown \['isk'\]; choose from .*isc"):
        evaluate(EvalConfig(gen_dir=str(root / "gen"), ref=str(manifest), metrics="fd,isk"))


def test_a_second_evaluation_into_one_folder_is_refused(sets, tmp_path):
    """Two evaluations of one checkpoint started together (say gen_seed=0 and 1) each skipped the clips the other
    had written into out/gen and scored the mix under its own settings."""
    from siren.lock import LockHeld, hold

    root, manifest, ids = sets
    with hold(tmp_path / "out" / "eval.lock", "an evaluation of RUN", "wait"):
        with pytest.raises(LockHeld, match=r"eval\.lock: held by an evaluation of RUN .*give this one another out="):
            evaluate(EvalConfig(gen_dir=str(root / "gen"), ref=str(manifest), out=str(tmp_path / "out"),
                                weights="random", metrics="fd"))
    assert not (tmp_path / "out" / "results.json").exists()


def test_caption_index_selects_the_kth_caption(sets):
    from eval.reference import select
    from siren.data.manifest import read_manifest

    root, manifest, ids = sets
    items = select(read_manifest(manifest, unique_ids=False), manifest, caption_index=1)
    assert [it.id for it in items] == ids and items[0].caption.startswith("caption 1 of")
    with pytest.raises(ManifestError, match="fewer captions"):
        select(read_manifest(manifest, unique_ids=False), manifest, caption_index=2)


def test_pretrained_weights_load_from_the_assets_cache(panns, sets, tmp_path, monkeypatch):
    from siren import assets

    monkeypatch.setenv("SIREN_CACHE", str(tmp_path / "assets"))
    with pytest.raises(assets.MissingWeightsError, match="prefetch panns_cnn14_16k"):
        PannsCnn14("pretrained")
    # A checkpoint in the published file's layout ({'model': state_dict}) at the expected place.
    dest = assets.path("panns_cnn14_16k")
    dest.parent.mkdir(parents=True)
    torch.save({"model": panns.net.state_dict(), "iteration": 0}, dest)
    # in the cache but not the publisher's file (Zenodo's md5): labelled by its path, not "pretrained"
    assert PannsCnn14("pretrained").weights_label == f"file {dest.resolve()}"
    import dataclasses

    from siren.io import file_digest

    monkeypatch.setitem(assets.ASSETS, "panns_cnn14_16k", dataclasses.replace(
        assets.ASSETS["panns_cnn14_16k"], digest=f"md5:{file_digest(dest, algorithm='md5')}"))
    loaded = PannsCnn14("pretrained")  # as if it were the publisher's
    assert loaded.weights_label == "pretrained" and loaded.weights_sha256 == sha256_file(dest)
    x = torch.from_numpy(synth(3, 2.0))[None]
    torch.testing.assert_close(loaded.forward(x)["logits"], panns.forward(x)["logits"])

    root, manifest, _ = sets
    results = evaluate(EvalConfig(gen_dir=str(root / "gen"), ref=str(manifest), weights="pretrained",
                                  out=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), metrics="fd,kl"))
    card = results["card"]
    assert card["weights"] == "pretrained" and "WARNING" not in card
    assert card["backbones"]["fd_kl_is"]["weights_sha256"] == sha256_file(dest)
    assert cards.RANDOM_BANNER not in cards.table([("x", results["metrics"])], card)


def test_isc_refuses_splits_of_one_clip(sets, tmp_path):
    """A split of one clip scores exactly 1, whatever the audio: 4 clips at is_splits=4 printed ISC 1.00 +- 0 (and
    the error for is_splits above the clip count advised it). Every split needs 2 clips."""
    root, manifest, ids = sets
    n = len(ids)
    with pytest.raises(EvalError, match=rf"needs at least 2 clips a split \({2 * n}\), got {n}; pass is_splits=K "
                                        rf"\(K <= {n // 2}\)"):
        evaluate(EvalConfig(gen_dir=str(root / "gen"), ref=str(manifest), weights="random", metrics="isc",
                            is_splits=n, out=str(tmp_path / "out"), cache=False))


def test_isc_splits_the_generated_folder_in_file_name_order(sets, tmp_path):
    """audioldm_eval reads the generated folder sorted by file name, then shuffles (seed 2020) and splits: the
    harness shuffled the manifest's order instead, so the same clips fell into other splits and the ISC moved
    with the manifest's row order. The parity tests listed the clips sorted, which hid it."""
    from eval import metrics as M
    from eval.audio import load_clips
    from eval.cache import EmbeddingCache, embed_clips

    root, manifest, ids = sets
    header, *rows = manifest.read_text().splitlines()
    shuffled = manifest.parent / "test_rows_reordered.csv"  # beside it: audio paths are relative to the manifest
    shuffled.write_text("\n".join([header, *rows[2:], *rows[:2]]) + "\n")

    def isc(ref):
        return evaluate(EvalConfig(gen_dir=str(root / "gen"), ref=str(ref), weights="random", metrics="isc",
                                   is_splits=2, out=str(tmp_path / ref.stem), cache_dir=str(tmp_path / "cache")))
    a, b = isc(manifest), isc(shuffled)
    assert a["metrics"]["isc"] == b["metrics"]["isc"] and a["metrics"]["isc_std"] == b["metrics"]["isc_std"]
    gen = load_clips({i: root / "gen" / f"{i}.wav" for i in sorted(ids)})  # the peer's order
    g, _ = embed_clips(PannsCnn14("random", seed=0), gen, EmbeddingCache(tmp_path / "cache"))
    want = M.inception_score(np.stack([e["logits"] for e in g]), 2, 2020)
    assert (a["metrics"]["isc"], a["metrics"]["isc_std"]) == pytest.approx(want, rel=1e-12)


def test_metrics_are_wired_to_the_right_sets(cli_run, sets):
    """KL is KL(ref || gen) per id, IS is over the generated clips, FD is generated vs reference."""
    from eval import metrics as M
    from eval.audio import load_clips
    from eval.cache import EmbeddingCache, embed_clips
    from eval.reference import select
    from siren.data.manifest import read_manifest

    root, manifest, ids = sets
    results = cli_run[1]
    items = select(read_manifest(manifest, unique_ids=False), manifest)
    ref = load_clips({it.id: it.audio for it in items})
    gen = load_clips({i: root / "gen" / f"{i}.wav" for i in ids})
    panns, cache = PannsCnn14("random", seed=0), EmbeddingCache(root / "cache")
    (r, sr), (g, sg) = embed_clips(panns, ref, cache), embed_clips(panns, gen, cache)
    assert sr.computed == sg.computed == 0  # read back what the CLI stored
    rl, gl = np.stack([e["logits"] for e in r]), np.stack([e["logits"] for e in g])
    kl, kl_rev = M.kl_divergence(rl, gl), M.kl_divergence(gl, rl)
    assert np.abs(kl - kl_rev).max() > 1e-8  # the two directions differ on these clips
    np.testing.assert_allclose(results["per_clip"]["kl"], kl, rtol=1e-12)
    np.testing.assert_allclose(results["per_clip"]["kl_gen_ref"], kl_rev, rtol=1e-12)
    assert results["metrics"]["isc"] == pytest.approx(M.inception_score(gl, 2, 2020)[0], rel=1e-12)
    assert results["metrics"]["isc"] != pytest.approx(M.inception_score(rl, 2, 2020)[0], rel=1e-12)


def test_text_embeddings_are_not_reused_under_another_library_version(tmp_path, monkeypatch):
    # the text key held the model's settings only: texts embedded under another transformers (tokenizer) or on a
    # GPU were read back as if computed here; the audio key had the versions and the device type all along
    import importlib.metadata

    from eval.backbones import ClapAudio
    from eval.cache import EmbeddingCache, embed_texts

    clap, cache = ClapAudio("random", seed=0), EmbeddingCache(tmp_path / "cache")
    assert embed_texts(clap, ["a dog barks"], cache)[1].computed == 1
    assert embed_texts(clap, ["a dog barks"], cache)[1].hits == 1
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda d: "9.9" if d == "transformers" else real(d))
    assert embed_texts(clap, ["a dog barks"], cache)[1].computed == 1


def test_clips_keep_channels_and_crop_and_mono_choices():
    from eval.audio import mono

    left, right = synth(1, 12.0, 8000), synth(2, 12.0, 8000)
    clip = make_clip("s", np.stack([left, right], 1), 8000)  # crop=whole by default, as the peers read files
    assert clip.wav.shape == (96000, 2)
    np.testing.assert_array_equal(mono(clip.wav, "first"), left)
    np.testing.assert_allclose(mono(clip.wav, "mean"), (left.astype(np.float64) + right) / 2, rtol=0, atol=1e-7)
    assert make_clip("s", left, 8000, crop="10s").wav.shape == (80000, 1)
    assert make_clip("s", left, 8000).content_hash != make_clip("s", left, 8000, crop="10s").content_hash
    # a stereo clip and the mono clip of its interleaved samples (the same bytes) are not one cache entry
    stereo = np.stack([left, -left], axis=1)
    assert make_clip("s", stereo, 8000).content_hash != make_clip("m", stereo.reshape(-1), 8000).content_hash
    for bad in ["channel=left", "resampler=sox", "fad_resampler=x", "crop=5s", "vggish_short=drop"]:
        key, value = bad.split("=")
        with pytest.raises(ConfigError, match=key):
            EvalConfig(**{key: value})


def test_vggish_short_clip_policies():
    clips = [make_clip("long", synth(1, 2.0), 16000), make_clip("short", synth(2, 0.5), 16000)]
    frames = {}
    for short in VGGish.SHORT:
        v = VGGish("random", seed=0, short=short)
        if short == "error":  # an input error of the project's own (one error: line), not a bare ValueError
            with pytest.raises(BadAudioError, match="0.975 s"):
                v.prepare(clips[1])
            continue
        frames[short] = [f["frames"].shape[0] for f in v.embed_batch([v.prepare(c) for c in clips])]
        assert v.protocol()["short"] == short
    assert frames == {"skip": [2, 0], "pad": [2, 1]}
    skip = VGGish("random", seed=0)
    assert skip.embed_batch([skip.prepare(clips[1])])[0]["frames"].shape == (0, 128)  # no forward on nothing


def test_a_clip_of_one_sample_at_another_rate_adds_no_vggish_frame(tmp_path):
    # resampy raises on a clip that resamples to no sample at all: FAD ended in a traceback after PANNs had run
    clip = make_clip("one", np.full(1, 0.1, np.float32), 44100)
    for short, frames in (("skip", 0), ("pad", 1)):
        v = VGGish("random", seed=0, short=short)
        assert v.embed_batch([v.prepare(clip)])[0]["frames"].shape == (frames, 128)
    with pytest.raises(BadAudioError, match="0.000 s is shorter than one VGGish example"):
        VGGish("random", seed=0, short="error").prepare(clip)


def test_a_clip_a_backbone_scores_as_nan_is_named_and_not_cached(panns, tmp_path):
    # float samples of 1e20 made PANNs' outputs NaN: KL and IS were NaN with status ok (invalid JSON in results.json),
    # FD a traceback naming no file, and the NaN embeddings were cached
    from eval.cache import EmbeddingCache, embed_clips

    cache = EmbeddingCache(tmp_path / "cache")
    good, huge = make_clip("good", synth(1, 2.0), 16000), make_clip("huge", synth(2, 2.0) * 1e20, 16000)
    with pytest.raises(BadAudioError, match=r"huge: panns_cnn14_16k gave NaN/inf for this clip .*outside \[-1, 1\]"):
        embed_clips(panns, [good, huge], cache, batch_size=1)
    _, stats = embed_clips(panns, [good], cache, batch_size=1)
    assert stats.hits == 1  # the clip computed before it is kept
    from safetensors.numpy import load_file

    stored = [load_file(p) for p in (tmp_path / "cache").rglob("*.safetensors")]
    assert len(stored) == 1 and all(np.isfinite(v).all() for s in stored for v in s.values())


def test_generation_keys_with_gen_dir_and_an_out_named_like_a_clip_are_refused(sets, tmp_path):
    # candidates=4 was recorded in results.json as if applied to clips no one reject-sampled; out=<gen_dir>/x.wav
    # made a folder every later evaluation of gen_dir failed on
    root, manifest, ids = sets
    for key in ("candidates=4", "seconds=3", "sample.top_k=250", "gen_seed=1"):
        with pytest.raises(ConfigError, match=rf"{key.split('=')[0].split('.')[0]}: key\(s\) of generating"):
            load_config(EvalConfig, [f"gen_dir={root / 'gen'}", f"ref={manifest}", key])
    with pytest.raises(ConfigError, match=r"x\.wav: a folder named like a clip in gen_dir"):
        evaluate(EvalConfig(gen_dir=str(root / "gen"), ref=str(manifest), out=str(root / "gen" / "x.wav"),
                            weights="random", cache=False))
    assert not (root / "gen" / "x.wav").exists()
    # nor are their defaults recorded as the clips' settings (a calibration row's 1 s clips read "seconds": 10.0)
    res = evaluate(EvalConfig(gen_dir=str(root / "gen"), ref=str(manifest), out=str(tmp_path / "o"), weights="random",
                              cache=False, metrics="fd"))
    assert not set(res["config"]) & {"seconds", "gen_batch_size", "gen_seed", "candidates", "sample"}


def test_fad_of_a_set_of_clips_all_under_one_vggish_example_is_one_error(tmp_path):
    manifest, ids = make_reference(tmp_path / "ref", n=3, seconds=0.5)
    write_set(tmp_path / "gen", ids, seed=2, seconds=0.5)
    cfg = EvalConfig(gen_dir=str(tmp_path / "gen"), ref=str(manifest), weights="random", out=str(tmp_path / "out"),
                     cache=False, metrics="fad")
    with pytest.raises(EvalError, match=r"FAD needs at least 2 VGGish examples .*got gen 0, ref 0.*vggish_short=pad"):
        evaluate(cfg)


def test_a_generated_clip_is_soundfiles_float_wav_without_its_time_stamped_peak_chunk(tmp_path):
    """libsndfile's float WAV carries a PEAK chunk with the time of writing: the same samples were other bytes, and
    another sha256 in generation.json, on every run. The clip is the same file less that chunk, read back exactly."""
    import io

    from eval.generate import write_clip

    x = np.random.default_rng(0).standard_normal(1600).astype(np.float32)
    x[3] = 1.7  # past full scale: a float file keeps it
    write_clip(tmp_path / "a.wav", x)
    ours, buf = (tmp_path / "a.wav").read_bytes(), io.BytesIO()
    sf.write(buf, x, 16_000, format="WAV", subtype="FLOAT")
    theirs = buf.getvalue()
    at = theirs.index(b"PEAK")
    less = theirs[:at] + theirs[at + 8 + int.from_bytes(theirs[at + 4:at + 8], "little"):]
    assert b"PEAK" not in ours and ours == less[:4] + (len(less) - 8).to_bytes(4, "little") + less[8:]
    y, sr = sf.read(tmp_path / "a.wav", dtype="float32")
    assert sr == 16_000 and np.array_equal(x, y) and sf.info(tmp_path / "a.wav").subtype == "FLOAT"


def test_reject_sampling_keeps_each_captions_best_clap_candidate(tmp_path):
    """candidates=N (the paper's CLAP reject sampling): each caption's clip is, of its N seeded candidates, the one
    the CLAP model scores highest; candidates=1 writes candidate 0. The candidates are drawn here with the
    sampler and the codec the run's own frontends give, and scored with the same (seeded random) CLAP. The
    run's codec is the small demo one: decoding 21 clips with the paper-size random DAC was half this test."""
    import siren
    from eval.generate import generate_set
    from siren.clap import Clap, ClapConfig
    from siren.codec import FRAME_RATE, SAMPLE_RATE
    from siren.config import to_dict
    from siren.frontends import run_frontends
    from siren.run_dir import read_run_config
    from siren.runtime import derive_seed
    from siren.sample import SampleConfig, generate_with_info
    from siren.text import TextConfig, TextEncoder
    from tests.fixtures_rl import make_stage1_run

    codec, text = demo_codec(), TextEncoder(TextConfig(weights="random"))
    run = make_stage1_run(tmp_path / "run", "12-1", seed=0, tables=codec.code_tables(), codec_id=codec.id,
                          text_id=text.id, frontends={"codec": to_dict(codec.cfg), "text": to_dict(text.cfg)})
    ids, caps, n, seconds = ["a", "b", "c"], ["a dog barks", "rain on a roof", "a bell rings"], 3, 0.2
    clap = Clap(ClapConfig(weights="random"))

    def made(folder, candidates):
        card = generate_set(run, ids, caps, folder, seconds=seconds, batch_size=len(ids), seed=5,
                            sample=SampleConfig(), candidates=candidates, clap=clap if candidates > 1 else None)
        assert card["candidates"] == candidates and card["generated_now"] == len(ids)
        return torch.stack([torch.from_numpy(sf.read(folder / f"{i}.wav", dtype="float32")[0]) for i in ids])

    best, first = made(tmp_path / "best", n), made(tmp_path / "first", 1)
    model = siren.load(run, "cpu")
    txt, dec = run_frontends(read_run_config(run), "cpu", where=str(run), clap=clap)
    states = txt.encode(caps)
    wavs = torch.stack([dec.decode(generate_with_info(model, states, round(seconds * FRAME_RATE), SampleConfig(),
                                                      seed=derive_seed(5, c, 0))[0]).float() for c in range(n)])
    scores = torch.stack([clap.score(w, caps, sample_rate=SAMPLE_RATE) for w in wavs])  # [N, B]
    pick = scores.argmax(0)
    assert pick.tolist() != [0] * len(ids)  # so keeping candidate 0 would fail this test
    torch.testing.assert_close(first, wavs[0], rtol=0, atol=0)
    torch.testing.assert_close(best, wavs[pick, torch.arange(len(ids))], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="candidates=3 .* add clap to metrics=fd"):
        EvalConfig(metrics="fd", candidates=3)


def test_a_run_with_demo_frontends_scored_by_other_metrics_is_not_labelled_as_those(tmp_path):
    """The card's weights came from the metric networks alone: a demo-trained run (demo codec and text encoder)
    scored with weights=pretrained was labelled "pretrained", no banner. The generation's modes count too."""
    from eval.audiocaps import main
    from siren.config import to_dict
    from siren.text import TextConfig, TextEncoder
    from tests.fixtures_rl import make_stage1_run

    codec, text = demo_codec(), TextEncoder(TextConfig(weights="random"))
    run = make_stage1_run(tmp_path / "run", "12-1", seed=0, tables=codec.code_tables(), codec_id=codec.id,
                          text_id=text.id, frontends={"codec": to_dict(codec.cfg), "text": to_dict(text.cfg)},
                          codec_weights="demo")
    from tests.fixtures_data import write_wav

    for i, f in zip("ab", (440.0, 660.0)):
        write_wav(tmp_path / f"{i}.wav", 0.3 * np.sin(2 * np.pi * f * np.arange(8000) / 16_000))
    (tmp_path / "R.csv").write_text("id,audio,caption\na,a.wav,a dog barks\nb,b.wav,rain\n")
    assert main([f"ckpt={run}", f"ref={tmp_path / 'R.csv'}", f"out={tmp_path / 'o'}", "weights=random",
                 "metrics=fd", "seconds=0.2"]) == 0
    card = json.loads((tmp_path / "o" / "results.json").read_text())["card"]
    assert card["weights"].startswith("mixed: ") and "generation codec=demo," in card["weights"]
    assert "generation text=random" in card["weights"] and card["WARNING"].startswith("RANDOM WEIGHTS")
    # all demo: "demo" (the codec's long label made it "mixed")
    assert main([f"ckpt={run}", f"ref={tmp_path / 'R.csv'}", f"out={tmp_path / 'o2'}", "weights=demo",
                 "metrics=fd", "seconds=0.2", "gen_batch_size=2"]) == 0
    card = json.loads((tmp_path / "o2" / "results.json").read_text())["card"]
    assert card["weights"] == "mixed: fd_kl_is=demo, generation codec=demo, generation text=random"
    # the same clips scored again from their folder (gen_dir=): the folder's record says what made them (the card
    # was the metric networks' alone, so demo-codec clips scored with demo metrics read "demo")
    assert main([f"gen_dir={tmp_path / 'o2' / 'gen'}", f"ref={tmp_path / 'R.csv'}", f"out={tmp_path / 'o3'}",
                 "weights=demo", "metrics=fd"]) == 0
    again = json.loads((tmp_path / "o3" / "results.json").read_text())["card"]
    assert again["weights"] == card["weights"] and again["generated"]["run_dir"] == str(run.resolve())
    assert again["generated"]["weights_sha256"] == card["generated"]["weights_sha256"]
    # a clip replaced since (another system's, noise): the record credited the run with it, its modes in the label
    sf.write(tmp_path / "o2" / "gen" / "b.wav", np.zeros(3200, dtype=np.float32), 16_000)
    assert main([f"gen_dir={tmp_path / 'o2' / 'gen'}", f"ref={tmp_path / 'R.csv'}", f"out={tmp_path / 'o4'}",
                 "weights=demo", "metrics=fd"]) == 0
    replaced = json.loads((tmp_path / "o4" / "results.json").read_text())["card"]
    assert replaced["weights"] == "demo" and "run_dir" not in replaced["generated"]
    assert replaced["generated"]["record"].startswith("1 of 2 clip(s) are not the bytes generation.json records "
                                                      "(e.g. b)")
    # a stage-2 run's reward counts too: a model aligned on a RANDOM reward is a smoke test, whatever scores it
    from eval.generate import made_with

    (run / "alignment.json").write_text(json.dumps({"weights_labels": {"reward": "random"}}))
    assert made_with(run) == {"codec": "demo", "text": "random", "reward": "random"}


def test_a_card_with_a_codec_given_by_path_says_so_not_demo_or_pretrained():
    # a run trained on a codec file given by path (a fine-tuned DAC) is labelled by that path; its banner is
    # neither the demo's nor absent
    from analysis.logs import weights_phrase
    from eval.card import FILE_BANNER, build

    cards = {"fd_kl_is": {"weights": "pretrained"}}
    card = build(cards, {}, {}, {}, {"frontends_weights": {"codec": "file /x/dac.pth", "text": "pretrained"}}, 2, "cpu")
    assert card["weights"] == "mixed: fd_kl_is=pretrained, generation codec=file /x/dac.pth, generation text=pretrained"
    assert card["WARNING"] == FILE_BANNER
    assert weights_phrase("codec", "file /x/dac.pth") == weights_phrase("codec", "/x/dac.pth") == \
        "codec: weights from /x/dac.pth"
    assert weights_phrase("text", "random") == "RANDOM text weights"
    # the banner comes from each part's mode, not from words in the label: a path with "random" in it was the
    # RANDOM banner; demo metrics beside a file codec said only the file's
    from eval.card import DEMO_BANNER, RANDOM_BANNER, banner

    assert banner("file /home/u/randomized_trials/clap.pt") == FILE_BANNER
    assert banner("mixed: fd_kl_is=pretrained, generation text=file /scratch/randomx/clap.pt") == FILE_BANNER
    assert banner("mixed: fd_kl_is=demo, generation codec=file /x/dac.pth") == f"{FILE_BANNER}; {DEMO_BANNER}"
    assert banner("mixed: fd_kl_is=demo, generation text=random") == RANDOM_BANNER
    assert banner("demo") == DEMO_BANNER and banner("random") == RANDOM_BANNER


def test_the_readmes_python_snippet_generates_audio(tmp_path):
    """README, "From Python": the block as written, on a small run (demo codec, random text) in place of ID."""
    import re

    from siren.config import to_dict
    from siren.text import TextConfig, TextEncoder
    from tests.fixtures_rl import make_stage1_run

    block = re.search(r"\*\*From Python\*\*.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README lost its From Python block"
    codec, text = demo_codec(), TextEncoder(TextConfig(weights="random"))
    run = make_stage1_run(tmp_path / "run", "6-2", tables=codec.code_tables(), codec_id=codec.id, text_id=text.id,
                          frontends={"codec": to_dict(codec.cfg), "text": to_dict(text.cfg)})
    source = block.group(1).replace('"outputs/demo/stage1/ID"', repr(str(run)))
    assert source != block.group(1)
    scope: dict = {}
    exec(compile(source, "README.md (From Python)", "exec"), scope)  # noqa: S102 (the project's own README)
    assert scope["codes"].shape == (1, 12, 50) and scope["wav"].shape == (1, 16000)
    assert scope["wav"].dtype == torch.float32 and torch.isfinite(scope["wav"]).all()


def test_the_eval_benchmark_labels_demo_weights_as_demo(capsys):
    """benchmarks.eval printed the RANDOM banner for weights=demo (any mode but pretrained)."""
    from benchmarks import eval as bench

    assert bench.main(["weights=demo", "n=2", "seconds=1", "metrics=fd"]) == 0
    out = capsys.readouterr().out
    assert out.count(cards.DEMO_BANNER) == 2 and "RANDOM" not in out
    # n < 20 with isc: IS splits of 1 clip were refused after the first table; bad values named after it
    assert bench.main(["n=4", "seconds=1", "metrics=isc"]) == 0
    capsys.readouterr()
    for bad, words in (("metrics=fd,isk", "unknown \\['isk'\\]"), ("weights=bogus", "weights must be pretrained")):
        with pytest.raises(ConfigError, match=words):
            bench.main([bad])
    assert "eval.bench" not in capsys.readouterr().out


def test_a_bad_weights_mode_is_named_before_out_is_made(tmp_path, capsys):
    # it was checked when the backbones were listed: out= and its eval.lock were made first (with ckpt= and no
    # out=, inside the run: RUN/eval/eval.lock)
    from eval.audiocaps import main

    write_set(tmp_path / "gen", ["a", "b"], seed=1)
    assert main([f"gen_dir={tmp_path / 'gen'}", "ref=demo", "weights=foo", f"out={tmp_path / 'e1'}"]) == 2
    assert "weights must be pretrained, demo or random, got 'foo'" in capsys.readouterr().err
    assert not (tmp_path / "e1").exists()


def test_a_clip_named_in_another_unicode_form_is_said_to_be_one(tmp_path):
    # 'café' missing and 'café' extra looked identical on screen: one name is NFC, the other NFD (a Mac's)
    from eval.reference import match_generated

    write_set(tmp_path, ["cafe\u0301", "b"], seed=1)
    with pytest.raises(ManifestError) as e:
        match_generated(tmp_path, ["caf\u00e9", "b"])
    assert "the same names in another Unicode form there (as a Mac's HFS+ or a copy from it writes them): " \
           "'cafe\\u0301'; rename them to the ids' exact form" in str(e.value)
    # a name with a space at an end: the manifest's ids are stripped, and "missing: lead" / "extra:  lead" looked alike
    write_set(tmp_path / "s", [" lead", "b"], seed=1)
    with pytest.raises(ManifestError, match=r"missing 1: lead\n.*extra 1 \(not in the reference set\): ' lead'"):
        match_generated(tmp_path / "s", ["lead", "b"])
