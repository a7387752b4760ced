"""Stage-2 rewards: ImageBind's preprocessing against the package's own data.py, the real ImageBind-Huge class
scoring rollouts, and the "reward = metric" label when a run is aligned with the CLAP metric's checkpoint."""
from __future__ import annotations

import importlib.util
import json
import sys
import time
import types

import pytest
import torch

from siren.errors import MissingWeightsError
from siren.rl import imagebind as ib
from tests.fixtures_model import demo_codec
from tests.helpers import in_ci

try:
    ib.package_dir()
    HAVE_IMAGEBIND = True
except ImportError:
    HAVE_IMAGEBIND = False
# CI installs the [imagebind] extra (.ci/setup): there a missing package fails instead of skipping, on Linux (the
# extra installs nothing elsewhere: its decord has no macOS arm64 package).
needs_imagebind = pytest.mark.skipif(not HAVE_IMAGEBIND and not (in_ci() and sys.platform == "linux"),
                                     reason='needs pip install -e ".[imagebind]" (Linux)')


@pytest.fixture
def upstream_data(monkeypatch):
    """imagebind/data.py itself, loaded with the two shims it needs beside torch 2.13 / setuptools >= 81
    (pkg_resources for its BPE path, torchvision's renamed functional_tensor for pytorchvideo.transforms)."""
    import torchvision.transforms._functional_tensor as ft

    root = ib.package_dir()
    ib.models()
    monkeypatch.setitem(sys.modules, "torchvision.transforms.functional_tensor", ft)
    monkeypatch.setitem(sys.modules, "pkg_resources",
                        types.SimpleNamespace(resource_filename=lambda pkg, rel: str(root / rel)))
    spec = importlib.util.spec_from_file_location("_upstream_imagebind_data", root / "data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def upstream_audio(data, wav: torch.Tensor) -> torch.Tensor:
    """data.py's own load_and_transform_audio_data, its torchaudio.load answering with ``wav`` (16 kHz, mono)."""
    import torchaudio

    real = data.torchaudio
    data.torchaudio = types.SimpleNamespace(load=lambda path: (wav[None].clone(), 16000),
                                            functional=torchaudio.functional, compliance=torchaudio.compliance)
    try:
        return data.load_and_transform_audio_data(["rollout.wav"], "cpu")[0]
    finally:
        data.torchaudio = real


@needs_imagebind
def test_audio_inputs_and_tokens_equal_imagebinds_own(upstream_data):
    g = torch.Generator().manual_seed(0)
    for n in (1600, 32000, 40000, 82721, 160000):  # shorter than, equal to, and longer than the 2 s window
        wav = 0.1 * torch.randn(n, generator=g)
        torch.testing.assert_close(ib.audio_inputs(wav[None])[0], upstream_audio(upstream_data, wav), rtol=0, atol=0)
    caps = ["a dog barks", "rain on a tin roof while thunder rumbles in the distance"]
    assert torch.equal(ib.tokenizer()(caps), upstream_data.load_and_transform_text(caps, "cpu"))
    assert (ib.package_dir() / ib.BPE).is_file()  # the vocabulary ships inside the package: tokenising is offline


@needs_imagebind
def test_pretrained_imagebind_needs_its_file(empty_cache):
    with pytest.raises(MissingWeightsError, match="imagebind_huge.pth"):
        ib.ImageBindReward("pretrained")
    with pytest.raises(MissingWeightsError, match="nowhere.pth"):
        ib.ImageBindReward(str(empty_cache / "nowhere.pth"))


@needs_imagebind
def test_reward_model_takes_imagebind_huges_arguments_and_its_files_text_and_audio(monkeypatch):
    """build() reads imagebind_huge's arguments from its source: they are the ones its call really passes; a
    state dict in the published layout (all six modalities) loses exactly the four the reward does not use."""
    seen = {}
    monkeypatch.setattr(ib.models(), "ImageBindModel", lambda **kwargs: seen.update(kwargs))
    ib.models().imagebind_huge(pretrained=False)
    assert ib.huge_kwargs() == seen and seen["text_num_blocks"] == 24  # the huge text trunk, not the default 12
    parts = ("modality_preprocessors", "modality_trunks", "modality_heads", "modality_postprocessors")
    every = ("vision", "text", "audio", "depth", "thermal", "imu")
    state = {f"{p}.{m}.w": torch.zeros(1) for p in parts for m in every}
    assert set(ib.reward_part({**state, "stray": torch.zeros(1)})) == {
        f"{p}.{m}.w" for p in parts for m in ("text", "audio")} | {"stray"}  # strict loading then refuses "stray"


@needs_imagebind
def test_imagebind_huge_random_weights_score_rollouts(upstream_data):
    # on the worker's one thread (tests/conftest.py): CI runs two test workers on its two cores, and two threads
    # here made this test slower, not faster (rewards 27-31 s against 25-26 s beside a busy core, 2026-12-05)
    from siren.rl.reward import RewardConfig, build_reward

    t0 = time.perf_counter()
    reward = build_reward(RewardConfig(name="imagebind", weights="random", seed=0))
    built = time.perf_counter() - t0
    assert type(reward.model).__module__ == "imagebind.models.imagebind_model"
    assert reward.weights_label == "random" and reward.id == "imagebind-huge-random-seed0"
    assert set(reward.model.modality_trunks) == set(reward.model.modality_heads) == {"text", "audio"}
    t = torch.arange(40000) / 16000
    noise = 0.1 * torch.randn(40000, generator=torch.Generator().manual_seed(1))
    audio = torch.stack([0.3 * torch.sin(2 * torch.pi * 440 * t), noise])
    captions = ["a high beep", "static noise"]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        r = reward(audio, captions)
    # the second cosine again from ImageBind's own preprocessing and tokenizer (data.py) through the same model
    emb = reward.model({"text": upstream_data.load_and_transform_text(captions[1:], "cpu"),
                        "audio": upstream_audio(upstream_data, audio[1])[None]})
    want = torch.nn.functional.cosine_similarity(emb["audio"], emb["text"], dim=-1)
    assert r.dtype == torch.float32 and r.shape == (2,) and torch.isfinite(r).all() and r[0] != r[1]
    torch.testing.assert_close(r[1:], want)
    print(f"imagebind-huge random build {built:.1f} s, two rewards {time.perf_counter() - t0 - built:.1f} s")


# ---------------------------------------------------------------- reward = metric

def test_clap_reward_run_is_marked_reward_equals_metric(tmp_path, caplog):
    """Stage 2 with the CLAP reward, then eval of that run: the CLAP column says "reward = metric" on the card,
    in the printed row and in the ablation table (md, tex, csv); an ImageBind-aligned run would not be marked."""
    from ablations.grid import load_grid
    from ablations.outcomes import from_results
    from ablations.tables import build_frame, to_latex, to_markdown
    from eval import card as cards
    from eval.audiocaps import backbones, evaluate, reward_equals_metric
    from eval.config import EvalConfig
    from siren.config import load_config, to_dict
    from siren.data.demo import demo_set
    from siren.rl import alignment
    from siren.text import TextConfig, TextEncoder
    from tests.fixtures_rl import make_stage1_run

    codec = demo_codec()
    text = TextEncoder(TextConfig(weights="random"))
    run = make_stage1_run(tmp_path / "s1", tables=codec.code_tables(), codec_id=codec.id, text_id=text.id,
                          frontends={"codec": to_dict(codec.cfg), "text": to_dict(text.cfg)})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog barks\nrain on a tin roof\n")
    out = tmp_path / "aligned"
    assert alignment.main([f"run_dir={run}", f"out={out}", f"prompts={prompts}", "steps=1", "batch=2", "group=2",
                           "seconds=0.1", "device=cpu", "reward=clap", "reward.weights=random",
                           "codec.weights=demo", "text.weights=random"], clap=text.clap) == 0
    assert json.loads((out / "alignment.json").read_text())["reward_model"] == {"name": "clap",
                                                                              "weights_sha256": "random-seed0"}
    ref = demo_set(tmp_path / "demo", n_train=1, n_test=1).test  # the embedded set, one test clip per class
    res = evaluate(load_config(EvalConfig, [f"ckpt={out}", f"ref={ref}", f"out={tmp_path / 'eval'}", "weights=random",
                                            "metrics=clap", "seconds=0.1", "cache=false"]))
    card = json.loads((tmp_path / "eval" / "results.json").read_text())["card"]
    assert card["reward_equals_metric"] == ["clap"] == res["card"]["reward_equals_metric"]
    assert "reward = metric" in card["metrics"]["clap"]["reward_equals_metric"]
    # the same clips evaluated as a folder (gen_dir=): marked too, from their record
    again = evaluate(load_config(EvalConfig, [f"gen_dir={tmp_path / 'eval' / 'gen'}", f"ref={ref}",
                                              f"out={tmp_path / 'again'}", "weights=random", "metrics=clap",
                                              "cache=false"]))
    assert again["card"]["reward_equals_metric"] == ["clap"] and again["metrics"]["clap"] == res["metrics"]["clap"]
    # ... from the reward model the record keeps, so also once the run is moved away (it was read from the run);
    # a record without it (before 2026-12-08) is read from its run where that is still there
    gen_args = [f"gen_dir={tmp_path / 'eval' / 'gen'}", f"ref={ref}", "weights=random", "metrics=clap", "cache=false"]
    out.rename(tmp_path / "moved")
    moved = evaluate(load_config(EvalConfig, [*gen_args, f"out={tmp_path / 'again_moved'}"]))
    assert moved["card"]["reward_equals_metric"] == ["clap"]
    assert moved["card"]["generated"]["reward_model"] == {"name": "clap", "weights_sha256": "random-seed0"}
    record_path = tmp_path / "eval" / "gen" / "generation.json"
    old_record = {k: v for k, v in json.loads(record_path.read_text()).items() if k != "reward_model"}
    record_path.write_text(json.dumps(old_record))
    with caplog.at_level("WARNING"):
        assert evaluate(load_config(EvalConfig, [*gen_args, f"out={tmp_path / 'old_gone'}"]))["card"][
            "reward_equals_metric"] == []  # the run is gone: nothing says what it was aligned with, and a warning
    assert "does not say which reward model" in caplog.text
    (tmp_path / "moved").rename(out)
    assert evaluate(load_config(EvalConfig, [*gen_args, f"out={tmp_path / 'old_there'}"]))["card"][
        "reward_equals_metric"] == ["clap"]
    row = cards.table([("aligned", res["metrics"])], card)
    assert f"{res['metrics']['clap']:.2f}{cards.REWARD_MARK}" in row and "reward = metric" in row
    grid = load_grid("table7")
    df = build_frame(grid, {grid.rows[0].label: from_results(res, grid)}, "ours (demo, RANDOM weights)")
    md, tex = to_markdown(df, grid, "demo"), to_latex(df, grid, "demo")
    assert "†" in md and "reward = metric" in md and r"\dag" in tex and "reward = metric" in tex
    assert df["Reward = metric"].tolist().count("CLAP") == 1  # the csv column, our row only
    # CLAP reject sampling (candidates=N) picks the clips with the CLAP metric's own model: marked too, saying so
    few = tmp_path / "demo" / "three.csv"  # three of the test clips: the marking, not the numbers, is checked
    few.write_text("".join(ref.read_text().splitlines(keepends=True)[:4]))
    res = evaluate(load_config(EvalConfig, [f"ckpt={run}", f"ref={few}", f"out={tmp_path / 'best2'}", "weights=random",
                                            "metrics=clap", "seconds=0.1", "cache=false", "candidates=2"]))
    assert res["card"]["reward_equals_metric"] == ["clap"]
    row = cards.table([("best of 2", res["metrics"])], res["card"])
    assert f"{res['metrics']['clap']:.2f}{cards.REWARD_MARK}" in row and "best of 2 candidates" in row
    again = evaluate(load_config(EvalConfig, [f"gen_dir={tmp_path / 'best2' / 'gen'}", f"ref={few}",
                                              f"out={tmp_path / 'again2'}", "weights=random", "metrics=clap",
                                              "cache=false"]))
    assert "best of 2 candidates" in again["card"]["metrics"]["clap"]["reward_equals_metric"]
    # ... unless another CLAP picked them (the record's scorer): a reject-sampled set, not by this metric's model
    record = json.loads((tmp_path / "best2" / "gen" / "generation.json").read_text())
    record["settings"]["scorer"] = "laion-clap-htsat-tiny-other"
    (tmp_path / "best2" / "gen" / "generation.json").write_text(json.dumps(record))
    again = evaluate(load_config(EvalConfig, [f"gen_dir={tmp_path / 'best2' / 'gen'}", f"ref={few}",
                                              f"out={tmp_path / 'again2'}", "weights=random", "metrics=clap",
                                              "cache=false"]))
    assert again["card"]["reward_equals_metric"] == [] and again["card"]["generated"]["candidates"] == 2
    # the same CLAP backbone against another reward model or another seed: not marked
    models = backbones(load_config(EvalConfig, ["weights=random", "metrics=clap"]))
    for other in ({"name": "imagebind", "weights_sha256": "random-seed0"},
                  {"name": "clap", "weights_sha256": "random-seed1"}):
        assert reward_equals_metric(other, models, ["clap"]) == []
    assert reward_equals_metric({"name": "clap", "weights_sha256": "random-seed0"}, models, ["clap"]) == ["clap"]
    assert reward_equals_metric({}, models, ["clap"]) == []  # a stage-1 run
