"""LAION-CLAP and the text encoder with random weights (explicit), laion_clap's own network code.

Builds four CLAPs: the shared random one (seed 0), one more of seed 0 and one of seed 1
(determinism), and one from a checkpoint file in laion-clap's layout (round trip).
"""
from __future__ import annotations

import dataclasses
import io
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from siren import assets
from siren.clap import CLAP_SAMPLE_RATE, CLIP_SAMPLES, Clap, ClapConfig, RobertaBpe
from siren.errors import CheckpointError
from siren.io import load_hashed, load_torch_weights, sha256_file
from siren.text import TextConfig, TextEncoder
from tests.fixtures_clap import random_clap, sine, write_tiny_roberta_vocab

CAPTIONS = ["a dog barks", "rain falls on a tin roof while thunder rumbles in the distance", "birds"]


def load_checkpoint(path):  # as siren.clap.Clap loads a laion-clap file
    return load_hashed(path, load_torch_weights)[0]


@pytest.fixture(scope="module")
def clap() -> Clap:
    return random_clap(0)


@pytest.fixture(scope="module")
def text(clap) -> TextEncoder:
    return TextEncoder(TextConfig(weights="random", seed=0), clap=clap)


# --- identity, determinism --------------------------------------------------------------------

def test_random_mode_is_labelled_seeded_and_leaves_global_rng_alone(clap, fresh_builds, monkeypatch):
    gpu_seeds = []  # torch.manual_seed reseeds (or queues a reseed of) every GPU's generator: not given back
    monkeypatch.setattr(torch.cuda, "manual_seed_all", gpu_seeds.append)
    assert clap.weights_label == "random" and "random-seed0" in clap.id and clap.card()["weights"] == "random"
    wav = 0.1 * torch.randn(1, 16_000, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    same = random_clap(0)
    assert torch.equal(torch.rand(3), expected_draw)  # the seeded build forked the RNG
    assert gpu_seeds == [123, 123]  # the test's own seeds only
    other = random_clap(1)
    assert all(torch.equal(v, clap.model.state_dict()[k]) for k, v in same.model.state_dict().items())
    assert torch.equal(same.embed_text(CAPTIONS), clap.embed_text(CAPTIONS))
    assert torch.equal(same.embed_audio(wav), clap.embed_audio(wav))
    assert same.id == clap.id and other.id != clap.id
    assert not torch.allclose(other.embed_text(CAPTIONS), clap.embed_text(CAPTIONS), atol=1e-3)
    assert not torch.allclose(other.embed_audio(wav), clap.embed_audio(wav), atol=1e-3)


def test_text_encoder_identity(text, clap):
    assert text.dim == 768 and text.weights_label == "random"
    assert clap.id in text.id and clap.tokenizer.id in text.id
    short = TextEncoder(TextConfig(weights="random", seed=0, max_length=16), clap=clap)
    assert short.id != text.id
    with pytest.raises(ValueError, match="does not match"):
        TextEncoder(TextConfig(weights="random", seed=1), clap=clap)


# --- text ---------------------------------------------------------------------------------------

def test_text_states_shape_mask_and_normalisation(text, clap):
    ts = text.encode(CAPTIONS)
    # expected token counts from laion_clap's CLIP BPE itself: <sot> + BPE tokens + <eot>
    counts = [len(clap.tokenizer._tok.encode(c)) + 2 for c in CAPTIONS]
    assert ts.states.shape == (3, max(counts), 768) and ts.states.dtype == torch.float32
    assert ts.mask.dtype == torch.bool and ts.mask.sum(1).tolist() == counts
    assert counts[1] > counts[0] > counts[2]  # longer caption -> more True entries
    assert all(ts.mask[i, :n].all() and not ts.mask[i, n:].any() for i, n in enumerate(counts))
    assert torch.all(ts.states[~ts.mask] == 0)
    assert torch.allclose(ts.pooled.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(ts.pooled, clap.embed_text(CAPTIONS), atol=1e-6)


def test_padding_does_not_change_the_encoding(text):
    batched = text.encode(CAPTIONS)
    for i, c in enumerate(CAPTIONS):
        one = text.encode([c])
        n = one.mask.shape[1]
        assert torch.allclose(batched.pooled[i], one.pooled[0], atol=1e-5)
        assert torch.allclose(batched.states[i, :n], one.states[0], atol=1e-4)
    # batch_size splits the work without changing it
    split = text.encode(CAPTIONS, batch_size=1)
    assert torch.equal(split.mask, batched.mask)
    assert torch.allclose(split.pooled, batched.pooled, atol=1e-5)


def test_pooled_is_laion_clap_text_embedding_at_77_tokens(text, clap):
    """laion-clap pads every caption to 77 and runs its own CLAP.get_text_embedding: same vectors."""
    ids, mask = clap.tokenizer(CAPTIONS)
    pad = 77 - ids.shape[1]
    ref = clap.model.get_text_embedding({"input_ids": F.pad(ids, (0, pad), value=clap.tokenizer.pad_id),
                                         "attention_mask": F.pad(mask, (0, pad))})
    assert torch.allclose(text.encode(CAPTIONS).pooled, ref, atol=1e-5)


def test_long_captions_are_truncated_keeping_end_token(clap):
    long = " ".join(["a very loud engine revs"] * 40)
    ts = TextEncoder(TextConfig(weights="random", seed=0, max_length=16), clap=clap).encode([long, "a dog"])
    assert ts.mask.shape == (2, 16) and ts.mask[0].all()
    ids, _ = clap.tokenizer([long], 16)
    assert ids[0, -1].item() == clap.tokenizer.eot and ids[0, 0].item() == clap.tokenizer.sot


def test_conditioning_keeps_the_authors_128_tokens_while_score_keeps_77(text, clap):
    """The authors condition on up to 128 tokens (their max_prompt_len); laion-clap embeds at 77."""
    long = " ".join(["a very loud engine revs"] * 40)
    ts = text.encode([long, "a dog"])
    assert ts.mask.shape == (2, 128) and ts.mask[0].all() and text.cfg.max_length == 128
    ids77, _ = clap.tokenizer([long])
    assert ids77.shape == (1, 77)
    # the score's embedding is the 77-token one, not the conditioning's pooled vector
    assert torch.allclose(clap.embed_text([long]), clap.text_forward([long], 77)[2], atol=1e-6)
    assert not torch.allclose(clap.embed_text([long]), ts.pooled[:1], atol=1e-4)
    assert torch.allclose(clap.embed_text(["a dog"]), ts.pooled[1:], atol=1e-5)
    with pytest.raises(ValueError, match=r"text\.max_length=513: must be in 3\.\.512"):
        TextEncoder(TextConfig(weights="random", seed=0, max_length=513), clap=clap)


def test_bad_caption_input(text):
    with pytest.raises(TypeError, match="non-empty list of str, got 'a dog barks'"):  # a str, not a list of them
        text.encode("a dog barks")
    with pytest.raises(TypeError, match="non-empty list"):
        text.encode([])
    with pytest.raises(ValueError, match="no captions"):
        text.clap.embed_text([])


# --- tokenizer guard, missing files ---------------------------------------------------------------

def test_degenerate_tokenizer_is_refused(tmp_path):
    # transformers 5 turns missing/empty vocabulary files into a specials-only tokenizer without error
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "vocab.json").write_text("{}")
    (empty / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(assets.MissingWeightsError, match="degenerate") as e:
        RobertaBpe(empty / "vocab.json", empty / "merges.txt")
    assert "prefetch roberta_vocab roberta_merges" in str(e.value) and str(empty / "vocab.json") in str(e.value)
    with pytest.raises(assets.MissingWeightsError, match="prefetch roberta_vocab") as e:
        RobertaBpe(tmp_path / "nowhere" / "vocab.json", tmp_path / "nowhere" / "merges.txt")
    assert "nowhere" in str(e.value)


def test_working_roberta_bpe_from_files(tmp_path):
    tok = RobertaBpe(*write_tiny_roberta_vocab(tmp_path))
    ids, mask = tok(["a dog", "rain falls"])
    # <s> a Ġdog </s> / <s> r ain Ġ f a l l s </s>, roberta's special ids, padded with <pad> = 1
    assert mask.sum(1).tolist() == [4, 10] and ids[0, 0] == 0 and ids[0, 3] == 2 and ids[1, 9] == 2
    assert tok.pad_id == 1 and ids[0, 4:].eq(1).all() and not mask[0, 4:].any()


def test_missing_pretrained_weights_name_file_and_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SIREN_CACHE", str(tmp_path))
    with pytest.raises(assets.MissingWeightsError) as e:
        Clap(ClapConfig(weights="pretrained"))
    assert "630k-audioset-best.pt" in str(e.value) and "python -m siren.assets prefetch clap" in str(e.value)
    with pytest.raises(assets.MissingWeightsError, match="nope.pt"):
        Clap(ClapConfig(weights=str(tmp_path / "nope.pt")))
    # weights present, tokenizer files missing: named too
    (tmp_path / "630k-audioset-best.pt").write_bytes(b"x")
    with pytest.raises(assets.MissingWeightsError, match="prefetch roberta_vocab"):
        Clap(ClapConfig(weights="pretrained"))
    with pytest.raises(assets.MissingWeightsError):
        TextEncoder(TextConfig(weights="pretrained"))


# --- checkpoint loading ---------------------------------------------------------------------------

class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


FORMATS = [(2, True), (4, True), (2, False), (4, False)]  # (pickle protocol, zip container)


@pytest.mark.parametrize("protocol,zipped", FORMATS)
def test_load_checkpoint_plain_weights_any_format(tmp_path, protocol, zipped):
    ckpt = {"epoch": np.int64(45), "lr": np.float64(1e-4), "name": "x",
            "state_dict": {"module.a": torch.arange(3.0), "module.b": torch.ones(2, 2, dtype=torch.int64)}}
    torch.save(ckpt, tmp_path / "c.pt", pickle_protocol=protocol, _use_new_zipfile_serialization=zipped)
    got = load_checkpoint(tmp_path / "c.pt")
    assert got["epoch"] == 45 and got["name"] == "x" and torch.equal(got["state_dict"]["module.a"], torch.arange(3.0))


@pytest.mark.parametrize("protocol,zipped", FORMATS)
def test_load_checkpoint_refuses_code(tmp_path, protocol, zipped):
    buf = io.BytesIO()
    torch.save({"state_dict": {"a": torch.ones(1)}, "x": _Evil()}, buf, pickle_protocol=protocol,
               _use_new_zipfile_serialization=zipped)
    (tmp_path / "evil.pt").write_bytes(buf.getvalue())
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path / "evil.pt")


def _su(text: str) -> bytes:  # SHORT_BINUNICODE: a protocol-4 opcode, so weights_only hands the file on
    return b"\x8c" + bytes([len(text)]) + text.encode()


def test_load_checkpoint_refuses_state_on_an_allowed_function(tmp_path):
    """A BUILD on an allow-listed function set its __defaults__ for the rest of the process: every later
    torch.load (weights_only too) rebuilt tensors negated. Refused now, and nothing is changed."""
    import zipfile

    from torch import _utils

    before = _utils._rebuild_tensor_v2.__defaults__
    buf = io.BytesIO()
    torch.save({"w": torch.ones(1)}, buf)
    payload = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}" + _su("__defaults__") + b"}" + _su("neg")
               + b"\x88s\x85s\x86b0}.")  # BUILD (None, {'__defaults__': ({'neg': True},)}) on the function
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:
        for name in src.namelist():
            z.writestr(name, payload if name.endswith("data.pkl") else src.read(name))
    with pytest.raises(pickle.UnpicklingError, match="evil.pt.*refusing BUILD on function"):
        load_checkpoint(tmp_path / "evil.pt")
    assert _utils._rebuild_tensor_v2.__defaults__ == before


def test_load_checkpoint_of_the_legacy_format_writes_nothing(tmp_path):
    """The legacy (non-zip) loader writes <class.__name__>.patch for a container whose source differs when the
    class's dump_patches is true; a file that set both (BUILD on a class) wrote where it chose."""
    import struct

    def uni(text):  # BINUNICODE
        return b"X" + struct.pack("<I", len(text.encode())) + text.encode()

    target = tmp_path / "written_by_pickle"
    main = (b"\x80\x02ctorch.serialization\n_get_layout\nq\x00}" + uni("dump_patches") + b"\x88s}" + uni("__name__")
            + uni(str(target)) + b"s\x86b0(" + uni("module") + b"h\x00" + uni("src.py") + uni("+ line") + b"tQ.")
    magic = b"L119547037146038801333356L\n."  # torch's legacy magic number as a text LONG: an unsupported operand
    (tmp_path / "legacy.pt").write_bytes(magic + b"\x80\x02M\xe9\x03." + b"\x80\x02}." + main + b"\x80\x02].")
    with pytest.raises(pickle.UnpicklingError, match="legacy.pt.*refusing"):
        load_checkpoint(tmp_path / "legacy.pt")
    assert not target.with_suffix(".patch").exists()


def test_unreadable_checkpoint_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("SIREN_CACHE", str(tmp_path))
    write_tiny_roberta_vocab(tmp_path / "roberta-base")
    torch.save({"epoch": 1}, tmp_path / "notclap.pt")
    with pytest.raises(CheckpointError, match="notclap.pt"):
        Clap(ClapConfig(weights=str(tmp_path / "notclap.pt")))


def test_pretrained_file_round_trip(clap, tmp_path, monkeypatch):
    """A CLAP in laion-clap's checkpoint layout (DDP 'module.' keys, position_ids, numpy epoch,
    pickle protocol 4) loads through weights=pretrained with strict=True and gives the same numbers.
    The weights: the random fixture's, with a RoBERTa-sized (50265-row) word embedding."""
    monkeypatch.setenv("SIREN_CACHE", str(tmp_path))
    tok = RobertaBpe(*write_tiny_roberta_vocab(tmp_path / "roberta-base"))
    src = dict(clap.model.state_dict())
    src["text_branch.embeddings.word_embeddings.weight"] = torch.randn(
        RobertaBpe.VOCAB_SIZE, 768, generator=torch.Generator().manual_seed(7)) * 0.02
    sd = {f"module.{k}": v for k, v in src.items()}
    sd["module.text_branch.embeddings.position_ids"] = torch.arange(514)[None]
    ckpt = tmp_path / "630k-audioset-best.pt"
    torch.save({"epoch": np.int64(45), "name": "test", "state_dict": sd}, ckpt, pickle_protocol=4)
    del sd

    # in the cache but not the publisher's file (its sha256): labelled by its path, not "pretrained"
    assert Clap(ClapConfig(weights="pretrained")).weights_label == f"file {ckpt.resolve()}"
    monkeypatch.setitem(assets.ASSETS, "clap", dataclasses.replace(assets.ASSETS["clap"],
                                                                   digest=f"sha256:{sha256_file(ckpt)}"))
    loaded = Clap(ClapConfig(weights="pretrained"))  # as if it were the publisher's
    assert loaded.weights_label == "pretrained" and loaded.weights_sha256 == sha256_file(ckpt)
    assert loaded.tokenizer.id == tok.id and tok.id in loaded.id and loaded.id != clap.id
    assert loaded.card()["checkpoint"] == "630k-audioset-best.pt"
    assert loaded.model.state_dict().keys() == src.keys()
    assert all(torch.equal(v, src[k]) for k, v in loaded.model.state_dict().items())
    wav = 0.1 * torch.randn(1, 16_000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded.embed_audio(wav), clap.embed_audio(wav))  # same audio branch, same numbers
    # text: laion-clap's own CLAP.get_text_embedding on roberta's tokens, padded to 77 as laion-clap does
    ids, mask = tok(CAPTIONS)
    ref = loaded.model.get_text_embedding({"input_ids": F.pad(ids, (0, 77 - ids.shape[1]), value=1),
                                           "attention_mask": F.pad(mask, (0, 77 - ids.shape[1]))})
    assert torch.allclose(loaded.embed_text(CAPTIONS), ref, atol=1e-5)
    # the same bytes given by path are not called pretrained unless they are the publisher's (its sha256)
    import shutil

    copy = tmp_path / "mine" / "finetuned.pt"
    copy.parent.mkdir()
    shutil.copy(ckpt, copy)
    assert Clap(ClapConfig(weights=str(copy))).weights_label == "pretrained"  # the publisher's bytes, anywhere
    (tmp_path / "mine" / "other.pt").write_bytes(copy.read_bytes() + b"\0")
    by_path = Clap(ClapConfig(weights=str(tmp_path / "mine" / "other.pt")))
    want = f"file {tmp_path / 'mine' / 'other.pt'}"
    assert by_path.weights_label == want and by_path.card()["weights"] == want
    # the CLAP metric hashes the file into its id at __init__ and loads it at first use: a file replaced
    # between them is one error naming it (it was a bare RuntimeError, a traceback at the command line)
    from eval.backbones import ClapAudio

    metric = ClapAudio("pretrained")
    other = {f"module.{k}": v + 1 if k == "text_branch.embeddings.word_embeddings.weight" else v
             for k, v in src.items()}
    torch.save({"epoch": np.int64(46), "name": "other", "state_dict": other}, ckpt, pickle_protocol=4)
    with pytest.raises(CheckpointError, match="630k-audioset-best.pt changed while this run was using it"):
        metric.net


# roberta-base's published config.json (https://huggingface.co/roberta-base/resolve/main/config.json), the one
# laion_clap's RobertaModel.from_pretrained('roberta-base') reads; siren.clap writes it out to build offline
ROBERTA_BASE = {"vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 514, "type_vocab_size": 1,
                "layer_norm_eps": 1e-05, "initializer_range": 0.02, "pad_token_id": 1, "bos_token_id": 0,
                "eos_token_id": 2}


def test_pretrained_text_branch_is_roberta_base_as_published():
    """The parity test's peer is built by the same siren.clap.build_model (laion_clap's own download cannot
    run here), so a wrong RoBERTa setting (layer_norm_eps, positions) would be on both sides: checked here
    against the published file instead."""
    import types

    from siren.clap import build_model

    model = build_model(types.SimpleNamespace(vocab_size=RobertaBpe.VOCAB_SIZE, pad_id=1))
    cfg = model.text_branch.config.to_dict()
    assert {k: cfg[k] for k in ROBERTA_BASE} == ROBERTA_BASE


def test_checkpoint_of_another_architecture_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("SIREN_CACHE", str(tmp_path))
    write_tiny_roberta_vocab(tmp_path / "roberta-base")
    torch.save({"state_dict": {"module.audio_branch.bn0.weight": torch.ones(64)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt.*HTSAT-tiny non-fusion"):
        Clap(ClapConfig(weights=str(tmp_path / "other.pt")))
    torch.save({"state_dict": {"module.audio_branch.patch_embed.proj.weight": torch.ones(1),
                               "module.text_branch.embeddings.word_embeddings.weight": torch.ones(49409, 768)}},
               tmp_path / "clipvocab.pt")
    with pytest.raises(ValueError, match=r"clipvocab.pt.*\(49409, 768\).*\(50265, 768\)"):
        Clap(ClapConfig(weights=str(tmp_path / "clipvocab.pt")))


# --- audio ----------------------------------------------------------------------------------------

def test_audio_preparation_is_laion_clap_repeatpad(clap):
    """Against laion_clap's own get_audio_features (numpy quantisation, repeatpad) for a 3.3 s clip."""
    from laion_clap.training.data import float32_to_int16, get_audio_features, int16_to_float32

    x48 = sine(440, 3.3, CLAP_SAMPLE_RATE)
    q = torch.from_numpy(int16_to_float32(float32_to_int16(x48.numpy()))).float()
    ref = get_audio_features({}, q, CLIP_SAMPLES, data_truncating="rand_trunc", data_filling="repeatpad",
                             audio_cfg=dataclasses.asdict(clap.model.audio_cfg))["waveform"]
    assert torch.equal(clap.prepare_audio(x48[None], CLAP_SAMPLE_RATE)[0], ref)


def test_audio_16k_and_48k(clap):
    """The same 440 Hz tone synthesised at 16 kHz and at 48 kHz: one embedding (resampled 16 -> 48 kHz)."""
    w16, w48 = sine(440, 3.0, 16_000), sine(440, 3.0, CLAP_SAMPLE_RATE)
    p16, p48 = clap.prepare_audio(w16[None], 16_000), clap.prepare_audio(w48[None], CLAP_SAMPLE_RATE)
    assert p16.shape == p48.shape == (1, CLIP_SAMPLES)
    interior = slice(100, 3 * CLAP_SAMPLE_RATE - 100)  # away from the resampler's edge transients
    assert (p16[0, interior] - p48[0, interior]).abs().max() < 1e-3
    e16, e48 = clap.embed_audio(w16[None]), clap.embed_audio(w48[None], sample_rate=CLAP_SAMPLE_RATE)
    other = clap.embed_audio(sine(3000, 3.0, 16_000)[None])
    assert torch.allclose(e16.norm(dim=-1), torch.ones(1), atol=1e-5)
    assert (e16 * e48).sum() > 0.999 and (e16 * e48).sum() > (e16 * other).sum()


def test_long_audio_is_deterministic_first_10s(clap):
    wav = 0.1 * torch.randn(1, 16_000 * 13, generator=torch.Generator().manual_seed(2))
    np.random.seed(0)
    a = clap.embed_audio(wav)
    np.random.seed(1)  # laion-clap's random crop draws from numpy
    assert torch.equal(clap.embed_audio(wav), a)
    # only the first 10 s count: resampling 11 s or 13 s gives the same first 10 s exactly
    assert torch.equal(clap.prepare_audio(wav), clap.prepare_audio(wav[:, :16_000 * 11]))


def test_audio_batching_and_ragged_lists(clap):
    wav = 0.1 * torch.randn(2, 16_000, generator=torch.Generator().manual_seed(3))
    batched = clap.embed_audio(wav)
    singles = torch.cat([clap.embed_audio(w[None]) for w in wav])
    assert batched.shape == (2, 512) and torch.allclose(batched, singles, atol=1e-5)
    assert torch.allclose(clap.embed_audio(wav, batch_size=1), batched, atol=1e-5)
    ragged = clap.prepare_audio([wav[0], wav[1, :7_000]])  # clips of different lengths, each repeat-padded
    assert torch.equal(ragged[0], clap.prepare_audio(wav[:1])[0])
    assert torch.equal(ragged[1], clap.prepare_audio(wav[1:, :7_000])[0])
    with pytest.raises(ValueError, match="empty"):
        clap.embed_audio([torch.zeros(0)])


def test_score_is_pairwise_cosine(clap):
    wav = 0.1 * torch.randn(1, 16_000, generator=torch.Generator().manual_seed(4))
    s = clap.score(wav, CAPTIONS[:1])
    expected = F.cosine_similarity(clap.embed_audio(wav), clap.embed_text(CAPTIONS[:1]), dim=-1)
    assert s.shape == (1,) and torch.allclose(s, expected, atol=1e-6)
    with pytest.raises(ValueError, match="captions"):
        clap.score(wav, CAPTIONS)


def test_eval_shares_its_clap_with_the_run_text_encoder(clap, text):
    """eval/generate passes the CLAP-score model to run_frontends: a run whose text encoder has the same
    weights and seed gets that model instead of a second build (the text ids are then still checked)."""
    from siren.codec import Codec, CodecConfig
    from siren.frontends import codec_entry, run_frontends, text_entry

    codec = Codec(CodecConfig(weights="random", seed=0))
    run_cfg = {"codec": codec_entry(codec), "text": text_entry(text)}
    shared, _ = run_frontends(run_cfg, clap=clap)
    assert shared.clap is clap and shared.id == text.id


def test_a_run_of_other_weights_is_refused_with_the_fix_for_its_mode(clap, text):
    """Rebuilding a run's frontends checks their ids: other pretrained files -> put the run's in $SIREN_CACHE;
    other demo files (a run trained before the committed demo files changed) -> the commit it was trained with."""
    from siren.codec import Codec, CodecConfig
    from siren.errors import CheckpointError
    from siren.frontends import codec_entry, run_frontends, text_entry

    random_codec = codec_entry(Codec(CodecConfig(weights="random", seed=0)))
    with pytest.raises(CheckpointError, match=r"text encoder other-clap, but .* give .*\$SIREN_CACHE"):
        run_frontends({"codec": random_codec, "text": {**text_entry(text), "id": "other-clap"}}, clap=clap)
    demo_codec = codec_entry(Codec(CodecConfig(weights="demo")))
    with pytest.raises(CheckpointError, match=r"codec dac16k-other, .* other demo files .* the commit it was trained"):
        run_frontends({"codec": {**demo_codec, "id": "dac16k-other"}, "text": text_entry(text)}, clap=clap)
