"""Config overrides, the assets registry, the CPU install fix-up and the DAC codec wrapper."""
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from siren import assets, demo_weights
from siren.codec import CODEBOOK_DIM, DAC_KWARGS, HOP, N_LAYERS, Codec, CodecConfig, weights_arg
from siren.config import ConfigError, from_dict, load_config, to_dict
from siren.io import sha256_file


@dataclass
class _Inner:
    dim: int = 8
    name: str = "x"


@dataclass
class _Outer:
    model: _Inner = field(default_factory=_Inner)
    seed: int = 0
    flag: bool = False


PRESETS = {"scale": {"tiny": {"model.dim": 4, "model.name": "tiny"}}}


def test_overrides_presets_then_explicit_keys():
    # an explicit key wins over a preset wherever it stands (it silently lost when it came before the preset)
    cfg = load_config(_Outer, ["model.dim=16", "scale=tiny", "flag=true"], PRESETS)
    assert (cfg.model.dim, cfg.model.name, cfg.flag) == (16, "tiny", True)
    assert load_config(_Outer, ["scale=tiny", "model.dim=16"], PRESETS).model.dim == 16
    # a command's defaults (presets or keys) give way to anything on the command line
    assert load_config(_Outer, ["scale=tiny"], PRESETS, defaults=["model.dim=16"]).model.dim == 4
    assert load_config(_Outer, ["model.dim=8"], PRESETS, defaults=["scale=tiny"]).model.dim == 8


def test_a_key_given_twice_with_one_value_is_that_value():
    assert load_config(_Outer, ["seed=3", "scale=tiny", "seed=3"], PRESETS).seed == 3


@pytest.mark.parametrize("args, words", [
    (["model.dimm=3"], ["model.dimm", "model.dim", "seed"]),
    (["scale=huge"], ["huge", "tiny"]),
    (["model.dim=abc"], ["model.dim", "abc"]),
    (["seed"], ["key=value"]),
    # OmegaConf resolved ${oc.env:...} (any environment variable into a config); ${x} and ??? were tracebacks
    (["model.name=${oc.env:HOME}"], ["model.name", "interpolations"]),
    (["model.name=a${b"], ["model.name", "interpolations"]),
    (["seed=???"], ["seed", "'???'"]),
    # the later of a key given twice silently won (also a preset group: scale=tiny scale=small trained small)
    (["seed=1", "flag=true", "seed=2"], ["'seed' given twice, as '1' and as '2': give it once"]),
    (["scale=tiny", "scale=other"], ["'scale' given twice"]),
])
def test_bad_keys_and_values_are_named(args, words):
    with pytest.raises(ConfigError) as e:
        load_config(_Outer, args, PRESETS)
    for w in words:
        assert w in str(e.value)


def test_dict_round_trip_rejects_unknown_keys():
    cfg = load_config(_Outer, ["model.dim=3"])
    assert from_dict(_Outer, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="zz"):
        from_dict(_Outer, {"model": {"dim": 1, "zz": 2}})


def test_missing_weights_name_file_place_and_prefetch(empty_cache):
    with pytest.raises(assets.MissingWeightsError) as e:
        assets.require("dac_16khz")
    msg = str(e.value)
    assert "weights_16khz.pth" in msg and str(empty_cache) in msg and "python -m siren.assets prefetch dac_16khz" in msg
    assert "weights=demo" in msg and "weights=random" in msg  # the two ways to run offline
    with pytest.raises(assets.MissingWeightsError) as e:
        assets.require("imagebind")
    assert "weights=demo" not in str(e.value)  # no demo ImageBind exists: not offered
    with pytest.raises(assets.MissingWeightsError):
        Codec(CodecConfig(weights="pretrained"))


def test_assets_list_command_runs_offline(empty_cache):
    out = subprocess.run([sys.executable, "-m", "siren.assets", "list"], capture_output=True, text=True, check=True)
    for name in assets.ASSETS:
        assert name in out.stdout
    assert "MISSING" in out.stdout
    # offline, the way on: the committed demo weights, and what has no stand-in
    last = out.stdout.splitlines()[-1]
    assert last.endswith("no demo stand-in for imagebind") and str(demo_weights.FILES) in last


def test_a_command_run_as_main_shows_its_status_lines(tmp_path):
    """`python -m siren.x` logs under "__main__", not under the package: the CLI shell shows its INFO lines too."""
    script = tmp_path / "command.py"
    script.write_text("import logging\nfrom siren import cli\n\n"
                      "cli.run(lambda argv: logging.getLogger(__name__).info('status line %s', argv))\n")
    proc = subprocess.run([sys.executable, str(script), "a=1"], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0 and "I __main__: status line ['a=1']" in proc.stderr, proc.stderr


def test_cpu_fixup_is_idempotent_and_packages_import():
    """.ci/setup ran the fix-up once; a second run finds torchaudio and torchvision importing in fresh
    interpreters (its own probe) and changes no file. In one more, the packages that import them import, and
    the harness's laion_clap import leaves NUMBA_CACHE_DIR as it was (laion_clap sets it to /tmp/)."""
    import torchaudio
    import torchvision

    def files():
        return {p: p.stat().st_mtime_ns for pkg in (torchaudio, torchvision)
                for p in Path(pkg.__file__).parent.rglob("*")
                if p.suffix in (".so", ".cpu-disabled") or p.name == "_meta_registrations.py"}

    before = files()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / ".ci" / "cpu_fixup.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "set aside" not in proc.stdout and "guarded" not in proc.stdout, proc
    assert files() == before
    code = "import os, dac, siren.clap; siren.clap._clap_module(); print(os.environ.get('NUMBA_CACHE_DIR'))"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "None", proc


def test_setup_names_a_python_too_old_or_a_venv_without_pip(tmp_path):
    """.ci/setup made its venv with whatever python3 was (3.9 on a macOS with only the Command Line Tools) and kept
    any .venv on later runs, PYTHON=... or not; the pip steps then failed. Now both are one line naming the fix,
    before anything is installed."""
    root = Path(__file__).resolve().parents[1]
    (tmp_path / ".ci").mkdir()
    for name in (".ci/setup", ".ci/cpu_fixup.py", "pyproject.toml"):
        shutil.copy(root / name, tmp_path / name)
    old = tmp_path / "python3.9"
    old.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "Python 3.9.6"\nexit 1\n')
    old.chmod(0o755)

    def setup(**env):
        return subprocess.run(["bash", str(tmp_path / ".ci" / "setup")], capture_output=True, text=True, timeout=60,
                              env={**os.environ, **env})

    proc = setup(PYTHON=str(old))
    assert proc.returncode == 2 and not (tmp_path / ".venv").exists()
    assert f"error: {old} is not a Python >= 3.10 (Python 3.9.6); run again with PYTHON=" in proc.stderr, proc.stderr
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").symlink_to(old)  # a venv of that python: kept before, whatever PYTHON
    proc = setup(PYTHON=sys.executable)
    assert proc.returncode == 2 and "error: .venv has no Python >= 3.10 with pip; delete it (rm -rf .venv)" in \
        proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def codec():
    return Codec(CodecConfig(weights="random", seed=0))


def test_codec_shapes_and_frame_rate(codec):
    wav = 0.1 * torch.randn(2, 16000, generator=torch.Generator().manual_seed(0))
    codes = codec.encode(wav)
    assert codes.shape == (2, N_LAYERS, 16000 // HOP) and codes.min() >= 0 and codes.max() < 1024
    assert codec.decode(codes).shape == (2, 16000)
    assert codec.weights_label == "random" and "random" in codec.id


def test_random_codec_is_seeded_and_leaves_global_rng_alone(codec, fresh_builds):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    same, other = Codec(CodecConfig(weights="random", seed=0)), Codec(CodecConfig(weights="random", seed=1))
    assert torch.equal(torch.rand(3), expected_draw)  # the seeded builds forked the RNG
    kept = codec.dac.state_dict()
    assert all(torch.equal(v, kept[k]) for k, v in same.dac.state_dict().items())
    assert not torch.equal(other.dac.encoder.block[0].weight_v, codec.dac.encoder.block[0].weight_v)
    assert same.id == codec.id != other.id


def test_layer_features_sum_to_dac_quantizer_output(codec):
    codes = torch.randint(0, 1024, (1, N_LAYERS, 7), generator=torch.Generator().manual_seed(1))
    vec, feat = codec.layer_features(codes)
    assert vec.shape == (1, N_LAYERS, 7, CODEBOOK_DIM)
    z, _, _ = codec.dac.quantizer.from_codes(codes)  # DAC's own sum of out-projected codebook vectors
    torch.testing.assert_close(feat.sum(1).transpose(1, 2), z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vec[0, 3, 2], codec.dac.quantizer.quantizers[3].codebook.weight[codes[0, 3, 2]])


def test_pretrained_file_path_round_trip_and_wrong_model(codec, tmp_path):
    good = tmp_path / "dac.pth"
    torch.save({"state_dict": codec.dac.state_dict(), "metadata": {"kwargs": DAC_KWARGS}}, good)
    loaded = Codec(CodecConfig(weights=str(good)))
    # a DAC given by path is not the published file (no published digest to tell): labelled by its path, which
    # the analyses read back from a prepared directory's label
    assert loaded.weights_label == f"file {good}" and loaded.id != codec.id
    assert weights_arg(loaded.weights_label) == str(good)
    wav = 0.1 * torch.randn(1, 8000, generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded.encode(wav), codec.encode(wav))
    bad = tmp_path / "dac44k.pth"
    torch.save({"state_dict": {}, "metadata": {"kwargs": {**DAC_KWARGS, "sample_rate": 44100}}}, bad)
    with pytest.raises(ValueError, match="dac44k.pth"):
        Codec(CodecConfig(weights=str(bad)))


def test_a_codec_file_replaced_while_loading_is_recorded_under_the_hash_of_what_was_loaded(codec, tmp_path,
                                                                                         monkeypatch):
    # hashed and loaded in two reads, a file replaced between them filed the first file's codes under the second's
    # hash (codec.id keys every codes cache)
    import siren.codec

    first, second = tmp_path / "dac.pth", tmp_path / "other.pth"
    torch.save({"state_dict": codec.dac.state_dict(), "metadata": {"kwargs": DAC_KWARGS}}, first)
    other = {k: v + 0.01 if v.is_floating_point() else v for k, v in codec.dac.state_dict().items()}
    torch.save({"state_dict": other, "metadata": {"kwargs": DAC_KWARGS}}, second)
    want = sha256_file(first)
    load_dac = siren.codec.load_dac

    def replace_then_load(f):
        # a new version lands after the hash's read, before the load's: one read serves both, so the first file
        # loads under its hash; a load by path after the hash (or before it, the original bug) gets the second
        os.replace(second, first)
        return load_dac(f)

    monkeypatch.setattr(siren.codec, "load_dac", replace_then_load)
    loaded = Codec(CodecConfig(weights=str(first)))
    assert loaded.weights_sha256 == want and sha256_file(first) != want
    wav = 0.1 * torch.randn(1, 8000, generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded.encode(wav), codec.encode(wav))  # the first file's weights, under its hash


def test_a_file_memory_mapped_by_path_is_checked_to_be_the_hashed_one(tmp_path):
    from siren.errors import CheckpointError
    from siren.io import load_hashed, load_torch_mmap

    path = tmp_path / "w.pt"
    torch.save({"w": torch.ones(2)}, path)
    out, sha = load_hashed(path, load_torch_mmap)  # as the ImageBind reward loads its 4.5 GB file
    assert torch.equal(out["w"], torch.ones(2)) and sha == sha256_file(path)

    def replaced_meanwhile(f):
        torch.save({"w": torch.zeros(2)}, tmp_path / "new.pt")
        os.replace(tmp_path / "new.pt", path)
        return load_torch_mmap(f)

    with pytest.raises(CheckpointError, match="w.pt was replaced while this run loaded it"):
        load_hashed(path, replaced_meanwhile)


def test_derived_seeds_do_not_collide_past_the_layout():
    from siren.runtime import derive_seed

    # the layout every committed demo number was drawn with: the codec's stage 4 seeds with 4 * 7919
    assert derive_seed(0, 4) == 31676 and derive_seed(2, 1, 3) == 2 * 1_000_003 + 7919 + 3
    # step 7919 of stream 0 was stream 1's step 0 (alignment's rollouts vs its fixed-prompt probe)
    assert derive_seed(7, 0, 7919) != derive_seed(7, 1, 0)
    counters = [*range(4), *range(7915, 7925), 1_000_003, 10**9]
    seeds = {(s, a, b): derive_seed(s, a, b) for s in (0, 1, 2, -1) for a in (*range(4), 127, 200) for b in counters}
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= v < 2**63 for v in seeds.values())  # torch.manual_seed and numpy take every one
    # a seed derived again from a hashed one (stage 2's rollout chunks from step >= 7919's seed) stays in range
    hashed = derive_seed(7, 0, 7919)
    assert all(0 <= derive_seed(hashed, 0, k) < 2**63 for k in range(3))
    torch.Generator().manual_seed(derive_seed(hashed, 0, 1))


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    from siren import cli

    def interrupted(argv):
        raise KeyboardInterrupt

    assert cli.call(interrupted, []) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted (Ctrl-C): what was checkpointed or written is kept") and "Traceback" not in err


def test_a_durable_record_is_on_disk_before_its_name(tmp_path, monkeypatch):
    """Done markers, results and commit points vouch for other files: without fsync, delayed allocation could keep
    a renamed record and lose its bytes in a node crash. A plain write stays without (cache entries, clips)."""
    from siren import io

    calls, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b):
        calls.append(("replace", str(b)))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    io.write_json(tmp_path / "x.done", {"finished": 1}, durable=True)
    assert [c[0] for c in calls] == ["fsync", "replace", "fsync"]
    assert calls[0][1].startswith(str(tmp_path / ".x.done.")) and calls[2][1] == str(tmp_path)
    calls.clear()
    io.write_json(tmp_path / "plain.json", {})
    assert calls == [("replace", str(tmp_path / "plain.json"))]


def test_help_lists_the_presets_a_command_takes(capsys):
    """`python -m siren.train --help` showed `scale=tiny` in its example but listed no scale= or arch= among the
    keys (the presets are sets of keys); now each command with presets lists their names."""
    from siren import cli
    from siren.rl.config import PRESETS as RL
    from siren.train_config import Stage1Config, preset_groups

    assert cli.call(lambda argv: 0, ["--help"], Stage1Config, "doc", preset_groups()) == 0
    shown = capsys.readouterr().out
    assert "\n  model.dim=1024\n" in shown and "presets (group=name" in shown
    assert "\n  scale=tiny|small|" in shown and "|cont-tiny|" in shown and "\n  arch=official|legacy" in shown
    cli.call(lambda argv: 0, ["--help"], None, "doc", RL)
    assert "reward=clap|imagebind|code_match" in capsys.readouterr().out


def test_a_log_line_is_written_between_progress_bars_not_inside_one():
    """A warning logged while a bar was drawn (the demo CLAP's, built inside the first batch's bar) was written
    after the bar's text on the same line; now the bar is cleared, the line written, the bar drawn again."""
    import io
    import logging

    from tqdm import tqdm

    from siren import cli

    stream = io.StringIO()
    handler = cli._BetweenBars(stream)
    handler.setFormatter(logging.Formatter(cli.LOG_FORMAT, datefmt="%H:%M:%S"))
    log = logging.getLogger("siren.test_bars")
    log.addHandler(handler)
    try:
        with tqdm(total=2, desc="clap gen", file=stream, mininterval=0, disable=False) as bar:
            bar.update(1)
            log.warning("built the network")
            bar.update(1)
    finally:
        log.removeHandler(handler)
    line = next(x for x in stream.getvalue().split("\n") if "built the network" in x)
    assert line.rsplit("\r", 1)[-1].endswith("W siren.test_bars: built the network")
    assert "clap gen" not in line.rsplit("\r", 1)[-1]


def test_commands_hide_the_pinned_libraries_notices_about_their_internals_only():
    # every command that built the codec or CLAP printed three deprecation notices no user setting changes
    import warnings

    import dac
    import torch

    from siren import cli

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cli.setup_logging()
        dac.DAC(encoder_dim=4, encoder_rates=[2], decoder_dim=8, decoder_rates=[2], latent_dim=8, n_codebooks=2,
                codebook_size=4, codebook_dim=2)
        torch.meshgrid(torch.arange(2), torch.arange(3))
        warnings.warn("Importing from timm.models.layers is deprecated, please import via timm.layers", FutureWarning)
        warnings.warn("some other deprecation", FutureWarning)
        warnings.warn("torch.meshgrid: a notice in other words", UserWarning)
    assert [str(w.message) for w in seen] == ["some other deprecation", "torch.meshgrid: a notice in other words"]


def test_code_version_of_an_installed_copy_inside_another_checkout_is_not_that_checkouts(tmp_path, monkeypatch):
    # site-packages in a project's own .venv: `git -C <package root>` described the project's commit on every card
    import importlib.util

    repo = tmp_path / "project"
    site = repo / ".venv" / "site" / "siren"
    site.mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parents[1] / "siren" / "runtime.py", site / "runtime.py")
    env = {**os.environ, "GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@b", "GIT_COMMITTER_NAME": "a",
           "GIT_COMMITTER_EMAIL": "a@b"}
    subprocess.run(["git", "init", "-q", str(repo)], check=True, env=env)
    subprocess.run(["git", "-C", str(repo), "commit", "-q", "--allow-empty", "-m", "unrelated"], check=True, env=env)
    theirs = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    spec = importlib.util.spec_from_file_location("installed_runtime", site / "runtime.py")
    installed = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "installed_runtime", installed)  # its dataclasses look their module up
    spec.loader.exec_module(installed)
    assert theirs not in installed.code_version()
    # the harness as a tracked folder of a larger repository: that repository's commit is this code's
    subprocess.run(["git", "-C", str(repo), "add", "-f", "."], check=True, env=env)
    subprocess.run(["git", "-C", str(repo), "commit", "-q", "-m", "vendored"], check=True, env=env)
    ours = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert installed.code_version() == f"git {ours}"
    from siren.runtime import code_version

    assert code_version().startswith("git ")  # this checkout's own
