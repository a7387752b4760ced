"""family=continuous through the one stage-1 loop: config switch, resume equivalence, the run dir's model entry."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from siren.data.latents import collate_latents
from siren.errors import ConfigError, DataError
from siren.model.continuous import LatentProjection
from siren.train import Stage1Data, read_log, train
from tests.fixtures_model import demo_codec
from tests.fixtures_train import TEXT_DIM, count_steps, tiny_config
from tests.helpers import code_tables

K = 4  # token width


class SyntheticLatents(Dataset):
    """``n`` clips of random tokens [T_i, K] (ragged, so frame_mask padding is exercised) and text states."""

    def __init__(self, n: int, frames: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.items = [{"latents": torch.randn(frames - int(torch.randint(0, frames // 3 + 1, (), generator=g)), K,
                                              generator=g),
                       "text": torch.randn(5, TEXT_DIM, generator=g), "text_mask": torch.ones(5, dtype=torch.bool),
                       "id": f"clip{i}", "caption": f"synthetic clip {i}"} for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        return self.items[key[1]]


def latent_data(seed: int = 0) -> Stage1Data:
    g = torch.Generator().manual_seed(seed)
    proj = LatentProjection.fit([torch.randn(1024, 40, generator=g)], K)
    proj.id = "test-pca4"
    return Stage1Data(SyntheticLatents(6, 12, seed), SyntheticLatents(3, 12, seed + 1), collate_latents,
                      code_tables(seed), codec={"id": "test-tables", "weights": "random"},
                      text={"id": "test-text", "weights": "random"}, projection=proj)


ARGS = ("family=continuous", "scale=cont-tiny", f"continuous.token_dim={K}", "continuous.dim=32",
        "continuous.attn_heads=2", "continuous.layers=1", "continuous.head_width=16", "continuous.train_steps=50",
        "continuous.sample_steps=5", "train.grad_accum=2")


def losses(edir) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in read_log(edir) if not e.get("val")]


def test_continuous_resume_reproduces_uninterrupted_run(tmp_path, monkeypatch):
    """As test_train's discrete test: kill after the step-4 checkpoint, restart; steps 5..8 give the same losses
    bit for bit (CPU, fp32), MNTP masks and diffusion noise included (they draw from the restored RNG)."""
    args = (*ARGS, "continuous.mntp=true")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_config(straight, *args), latent_data(), handle_signals=False)
    want = losses(straight / "expert_0")
    train(tiny_config(resumed, *args), latent_data(), handle_signals=False)
    edir = resumed / "expert_0"
    shutil.rmtree(edir / "step_00000008")
    (edir / "latest").write_text("step_00000004\n")
    ran = count_steps(monkeypatch)
    result = train(tiny_config(resumed, *args), latent_data(), handle_signals=False)
    assert result.status == "finished" and result.step == 8 and len(ran) == 4
    got = losses(edir)
    assert [s for s, _ in got] == list(range(1, 9)) and got == want
    assert not any(k.startswith("ce/") for e in read_log(edir) for k in e)  # no per-layer CE for this family
    saved = json.loads((straight / "config.json").read_text())["model"]
    assert saved["family"] == "continuous" and saved["latent"] == "test-pca4" and saved["mntp"] is True


def test_continuous_validation_leaves_training_draws_alone(tmp_path):
    """val_every is a resumable change that "cannot change the loss curve", but the continuous loss draws
    diffusion noise: validating every 2 steps shifted every later training step's draws. Now validation has
    a stream of its own."""
    args = (*ARGS, "continuous.mntp=true")
    train(tiny_config(tmp_path / "plain", *args, "train.val_every=0"), latent_data(), handle_signals=False)
    train(tiny_config(tmp_path / "val", *args, "train.val_every=2"), latent_data(), handle_signals=False)
    assert losses(tmp_path / "val" / "expert_0") == losses(tmp_path / "plain" / "expert_0")
    vals = [e for e in read_log(tmp_path / "val" / "expert_0") if e.get("val")]
    assert [e["step"] for e in vals] == [2, 4, 6, 8] and len({e["loss"] for e in vals}) > 1  # the weights move


def test_continuous_loss_falls_and_mntp_changes_it(tmp_path):
    """The loop trains the model, and MNTP is a different objective. Trained: the loss over the last steps is below
    that of the same run with weights that cannot move (the same timesteps and noise drawn): each step's loss is
    decided by its draws, so the last steps against the first passed with an optimizer that did nothing."""
    plain = train(tiny_config(tmp_path / "a", *ARGS, "train.steps=40"), latent_data(), handle_signals=False)
    assert plain.status == "finished"
    la = [v for _, v in losses(tmp_path / "a" / "expert_0")]
    train(tiny_config(tmp_path / "frozen", *ARGS, "train.steps=40", "train.lr=1e-9", "train.min_lr=1e-9"),
          latent_data(), handle_signals=False)
    frozen = [v for _, v in losses(tmp_path / "frozen" / "expert_0")]
    assert sum(la[-8:]) < 0.98 * sum(frozen[-8:]), (la[-8:], frozen[-8:])  # 0.935 here; 1.000 with a no-op step
    train(tiny_config(tmp_path / "b", *ARGS, "train.steps=40", "continuous.mntp=true"), latent_data(),
          handle_signals=False)
    lb = [v for _, v in losses(tmp_path / "b" / "expert_0")]
    assert la != lb  # the same run but for MNTP (the schedule follows train.steps)


def test_token_width_must_match_the_data(tmp_path):
    with pytest.raises(ConfigError, match="token_dim"):
        train(tiny_config(tmp_path, *ARGS, "continuous.token_dim=8"), latent_data(), handle_signals=False)


def test_latents_of_a_file_changed_since_prepare_are_refused(tmp_path):
    """Latents are encoded from the source file when first asked for; one edited in place since prepare (same
    length: only the shape was checked) gave latents of audio its codes and index do not describe."""
    import soundfile as sf

    from siren.data.audio import AudioConfig
    from siren.data.latents import prepare_latents
    from siren.data.prepare import prepare
    from siren.text import TextConfig, TextEncoder
    from tests.fixtures_data import tiny_set

    codec = demo_codec()
    m = tiny_set(tmp_path / "src", n=2)
    prepare(m, tmp_path / "prep", codec=codec, text_encoder=TextEncoder(TextConfig(weights="random", seed=0)),
            split="train", audio=AudioConfig("pad", 0.4), progress=False)
    wav, sr = sf.read(tmp_path / "src" / "a0.wav")
    sf.write(tmp_path / "src" / "a0.wav", 0.5 * wav, sr)  # loudness-normalised in place
    with pytest.raises(DataError, match="a0.wav: changed since prepare encoded it"):
        prepare_latents(tmp_path / "prep", codec, K)


def test_damaged_or_missing_latent_files_are_made_again_and_found_before_training(tmp_path, caplog):
    """A latent, tokens or projection file cut short (a node lost mid-write) or deleted: a re-run of the latents
    command encodes (or fits) it again, to the same bytes, where it said success and left it; reading one is an
    error naming it, not a SafetensorError. A test split without its tokens is refused before training (it was
    found by the final validation, which runs before the last checkpoint: those steps were lost). Splits prepared
    with other audio settings each get their own (the train split's were applied to both)."""
    from siren.data.audio import AudioConfig
    from siren.data.cache import cache_path
    from siren.data.latents import LatentDataset, prepare_latents, tokens_key
    from siren.data.prepare import prepare
    from siren.text import TextConfig, TextEncoder
    from tests.fixtures_data import tiny_set

    codec = demo_codec()
    m = tiny_set(tmp_path / "src", n=3)
    out = tmp_path / "prep"
    prepare(m, out, codec=codec, text_encoder=TextEncoder(TextConfig(weights="random", seed=0)), split="train",
            audio=AudioConfig("pad", 0.4), progress=False)
    proj = prepare_latents(out, codec, K)  # the train split only: the test split is prepared after the latents
    prepare(m, out, codec=codec, text_encoder=TextEncoder(TextConfig(weights="random", seed=0)), split="test",
            audio=AudioConfig("pad", 0.2), progress=False)
    args = (*ARGS, f"data_dir={out}", "codec.weights=demo", "train.steps=2", "train.ckpt_every=2")
    with pytest.raises(DataError, match=rf"file\(s\) of its test split have no tokens of projection {proj.id}"):
        train(tiny_config(tmp_path / "run", *args), handle_signals=False)
    assert not (tmp_path / "run" / "expert_0").exists()  # before the first step
    assert prepare_latents(out, codec, K).id == proj.id  # the test split's at its own 0.2 s (0.4 s: refused)
    test = LatentDataset(out, "test", None, 0, proj.id)
    assert [test.tokens(i).shape[0] for i in range(len(test))] == [10] * len(test)  # 0.2 s at 50 frames/s

    train_ds = LatentDataset(out, "train", None, 0, proj.id)
    files = {"latent": cache_path(out, "latents", train_ds.items[0]["codes"]),
             "tokens": cache_path(out, "tokens", tokens_key(train_ds.items[0]["codes"], proj.id)),
             "projection": out / "latents" / f"projection-{proj.id}.safetensors"}
    saved = {k: f.read_bytes() for k, f in files.items()}
    files["tokens"].write_bytes(saved["tokens"][:40])
    with pytest.raises(DataError, match=rf"{files['tokens'].name}: a damaged or missing cache file"):
        train_ds.tokens(0)
    for name, f in files.items():
        f.write_bytes(saved[name][:40])
        assert prepare_latents(out, codec, K).id == proj.id, name
        assert f.read_bytes() == saved[name], name
    files["projection"].unlink()
    assert prepare_latents(out, codec, K).id == proj.id and files["projection"].read_bytes() == saved["projection"]
    assert "a damaged cache entry" in caplog.text
    # a mistyped data= makes no folder (the fit's lock made <typo>/latents/)
    with pytest.raises(DataError, match="no prepared train split"):
        prepare_latents(tmp_path / "typo", codec, K)
    assert not (tmp_path / "typo").exists()


def test_prepared_latents_match_codes_and_train(tmp_path):
    """siren.data.latents on a prepared dir: tokens have the codes' frames and crops, the whitened PCA gives the
    train split's real frames zero mean and unit variance per axis, a re-run encodes nothing, and the one loop
    trains on them from data_dir."""
    from siren.data.audio import AudioConfig
    from siren.data.latents import LatentDataset, prepare_latents
    from siren.data.prepare import prepare
    from siren.text import TextConfig, TextEncoder
    from tests.fixtures_data import tiny_set

    codec = demo_codec()
    m = tiny_set(tmp_path / "src", n=3)
    out = tmp_path / "prep"
    for split in ("train", "test"):
        prepare(m, out, codec=codec, text_encoder=TextEncoder(TextConfig(weights="random", seed=0)), split=split,
                audio=AudioConfig("pad", 0.4), progress=False)
    proj = prepare_latents(out, codec, K)
    ds = LatentDataset(out, "train", None, 0, proj.id)
    real = torch.cat([ds.tokens(i)[:it["real_frames"]] for i, it in enumerate(ds.items)])
    assert real.shape[-1] == K
    torch.testing.assert_close(real.mean(0), torch.zeros(K), atol=1e-4, rtol=0)
    torch.testing.assert_close(real.var(0), torch.ones(K), atol=1e-3, rtol=0)
    for i in range(len(ds)):
        assert ds.tokens(i).shape[0] == ds.codes(i).shape[-1]
    # a missing tokens file names the command with this projection's width (the default, 64, fits another)
    from siren.data.cache import cache_path
    from siren.data.latents import tokens_key

    gone = cache_path(out, "tokens", tokens_key(ds.items[0]["codes"], proj.id))
    saved_tokens = gone.read_bytes()
    gone.unlink()
    with pytest.raises(DataError, match=rf"{gone.name}: a damaged or missing cache file .*siren\.data\.latents data=.* "
                                        rf"dim={K} again"):
        ds.tokens(0)
    gone.write_bytes(saved_tokens)
    def stamps():  # the data written (the fit's lock file is written by every run)
        return {p: p.stat().st_mtime_ns for d in ("latents", "tokens") for p in (out / d).rglob("*")
                if p.is_file() and p.suffix != ".lock"}

    before = stamps()
    assert prepare_latents(out, codec, K).id == proj.id  # a re-run writes nothing: no encode, no refit
    assert stamps() == before
    # two fits of one width at once: the second is refused, naming the first
    from siren.lock import LockHeld, hold

    with hold(out / "latents" / f"pca{K}.lock", f"the latent projection of width {K}", "wait"):
        with pytest.raises(LockHeld, match=rf"pca{K}\.lock: held by the latent projection of width {K} "):
            prepare_latents(out, codec, K)
    # a projection fitted on another codec's latents (the folder prepared again since) is not reused
    from siren.data.latents import load_projection, projection_path

    pointer = projection_path(out, K)
    pointer.write_text(json.dumps({**json.loads(pointer.read_text()), "codec": "another-codec"}))
    with pytest.raises(DataError, match="fitted on codec another-codec's latents"):
        load_projection(out, K, codec.id)
    assert prepare_latents(out, codec, K).id == proj.id and json.loads(pointer.read_text())["codec"] == codec.id
    # nor one fitted on another train split (prepared again from another manifest, same codec): it was reused
    other = tiny_set(tmp_path / "src2", n=2)
    prepare(other, out, codec=codec, text_encoder=TextEncoder(TextConfig(weights="random", seed=0)), split="train",
            audio=AudioConfig("pad", 0.4), progress=False)
    with pytest.raises(DataError, match="fitted on another train split than .*prep's"):
        load_projection(out, K, codec.id)
    first, proj = proj, prepare_latents(out, codec, K)
    assert proj.id != first.id
    # a damaged or hand-edited record: a bare JSONDecodeError, and its id went into a file name unchecked
    saved = pointer.read_text()
    for text, words in (("{", "not readable JSON"), (json.dumps({**json.loads(saved), "id": "../../x"}),
                                                       f"not a projection record of width {K}")):
        pointer.write_text(text)
        with pytest.raises(DataError, match=f"{pointer.name}: {words}.*delete it and run python -m siren.data.latents"):
            load_projection(out, K, codec.id)
    pointer.write_text(saved)

    from siren.data import latents as latents_cli

    for command in (lambda: latents_cli.main([f"data={out}", f"dim={K}"]),  # before a pretrained file is looked for
                    lambda: train(tiny_config(tmp_path / "run", *ARGS, f"data_dir={out}", "train.steps=2"),
                                  handle_signals=False)):
        with pytest.raises(ConfigError, match=r"prep was prepared with another codec / text encoder than these "
                                              r"keys give: add codec\.weights=demo$"):
            command()
    assert latents_cli.main([f"data={out}", f"dim={K}", "codec.weights=demo"]) == 0
    args = (*ARGS, f"data_dir={out}", "codec.weights=demo", "train.steps=2", "train.ckpt_every=2")
    assert train(tiny_config(tmp_path / "run", *args), handle_signals=False).status == "finished"

    import soundfile as sf

    import siren
    from eval.generate import generate_set
    from siren.sample import SampleConfig

    model = siren.load(tmp_path / "run")  # the projection comes back from the checkpoint's buffers
    torch.testing.assert_close(model.projection.basis, proj.basis, rtol=0, atol=0)
    card = generate_set(tmp_path / "run", ["x"], ["a dog barks"], tmp_path / "gen", seconds=0.1, batch_size=1,
                        seed=0, sample=SampleConfig())
    wav, sr = sf.read(tmp_path / "gen" / "x.wav")
    assert card["generated_now"] == 1 and sr == 16_000 and len(wav) == 5 * 320
    assert torch.isfinite(torch.tensor(wav)).all()
    # top_k / top_p filter codes: a continuous model has none, and its card must not claim them
    with pytest.raises(ConfigError, match="continuous-token model"):
        generate_set(tmp_path / "run", ["y"], ["a cat"], tmp_path / "gen2", seconds=0.1, batch_size=1, seed=0,
                     sample=SampleConfig(top_k=250))
    assert not (tmp_path / "gen2" / "y.wav").exists()
    # the diffusion steps are a sampling key (they were fixed at training time): fewer steps, other audio
    few = generate_set(tmp_path / "run", ["x"], ["a dog barks"], tmp_path / "gen3", seconds=0.1, batch_size=1,
                       seed=0, sample=SampleConfig(diffusion_steps=3))
    assert card["sample"]["diffusion_steps"] == 5 and few["sample"]["diffusion_steps"] == 3  # 5: the model's own
    assert not np.array_equal(sf.read(tmp_path / "gen3" / "x.wav")[0], wav)
    with pytest.raises(ConfigError, match="exceeds the .* diffusion steps"):
        generate_set(tmp_path / "run", ["x"], ["a dog barks"], tmp_path / "gen4", seconds=0.1, batch_size=1, seed=0,
                     sample=SampleConfig(diffusion_steps=10**6))


def test_a_run_folder_of_the_other_family_is_named_in_one_sentence(tmp_path):
    # refused, but with every model key listed as differing ('<absent>' on one side): nothing said why
    from tests.fixtures_train import synthetic_data

    train(tiny_config(tmp_path, *ARGS, "train.steps=2", "train.ckpt_every=2"), latent_data(), handle_signals=False)
    for expert in (0, 1):  # its checkpoint, then the run's config.json (an expert not trained yet)
        with pytest.raises(ConfigError, match=r"holds a family=continuous model \(continuous tokens\); this run asks "
                                              r"for family=discrete: use another run_dir$"):
            train(tiny_config(tmp_path, "model.distribution=6-2", f"expert={expert}"), synthetic_data(),
                  handle_signals=False)
