"""Analysis probes: each numeric core against a constructed input with a known answer, then every
command end to end on the (small, prepared) demo set with random weights."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from analysis import (
    caption_reliance,
    continuous_recon,
    convergence,
    gradient_angles,
    orthogonality,
    prepared,
    reward_curves,
    rvq_depth,
    semantic_probe,
    style,
    task_vectors,
)
from analysis.cli import as_list, int_list
from analysis.cli import main as probe_main  # what python -m analysis.<probe> runs
from analysis.logs import metric_of, read_jsonl, read_results, weights_note
from siren.config import load_config
from siren.errors import ConfigError, DataError
from tests.fixtures_analysis import prepare_demo, tiny_run  # noqa: F401
from tests.helpers import run_as_main


def rng(seed=0):
    return np.random.default_rng(seed)


def orthonormal(n: int, d: int, seed=0) -> np.ndarray:
    """n orthonormal vectors in R^d (rows), randomly rotated."""
    q, _ = np.linalg.qr(rng(seed).standard_normal((d, n)))
    return q.T


# ---------------------------------------------------------------------------- orthogonality

def test_cosines_of_orthogonal_layers_are_zero_and_grouped_by_interval():
    J, d, N = 12, 40, 5
    base = orthonormal(J, d)
    feats = np.stack([base * rng(i).uniform(0.5, 3.0, (J, 1)) for i in range(N)])  # scaled: cosine ignores norms
    cos = orthogonality.cosine_matrix(feats)
    assert cos.shape == (N, J, J)
    np.testing.assert_allclose(cos, np.broadcast_to(np.eye(J), cos.shape), atol=1e-12)
    # a known non-zero cosine: layer 1 = layer 0 rotated by 60 degrees in its plane with layer 2
    feats[:, 1] = np.cos(np.pi / 3) * base[0] + np.sin(np.pi / 3) * base[2]
    cos = orthogonality.cosine_matrix(feats)
    np.testing.assert_allclose(cos[:, 0, 1], 0.5, atol=1e-12)
    groups = orthogonality.by_interval(cos)
    assert sorted(groups) == list(range(1, J))
    assert all(len(groups[k]) == N * (J - k) for k in groups)  # every pair j1 < j2 exactly once
    assert np.isclose(groups[1].sum(), N * 0.5 + N * math.cos(math.pi / 6) * 1)  # (0,1) and (1,2) pairs
    np.testing.assert_allclose(groups[5], 0.0, atol=1e-12)
    # the baseline pairs each sample with another one, never itself, and compares across the pair
    partner = orthogonality.unrelated(N, seed=0)
    assert sorted(partner) == list(range(N)) and all(partner != np.arange(N))
    same = np.stack([base] * N)  # every sample the same: across a pair layer j vs j is 1, j vs k 0
    np.testing.assert_allclose(orthogonality.cosine_matrix(same, same[partner]), np.broadcast_to(np.eye(J), (N, J, J)),
                               atol=1e-12)


# ---------------------------------------------------------------------------- gradient angles

def test_angles_of_identical_orthogonal_and_opposite_directions():
    v = rng().standard_normal(30)
    u = orthonormal(2, 30, seed=1)
    vecs = np.stack([v, 3.0 * v, u[0], u[1], -u[0]])
    a = gradient_angles.angle_matrix(vecs)
    assert a[0, 1] == pytest.approx(0.0, abs=1e-5)  # same direction, other length
    assert a[2, 3] == pytest.approx(90.0, abs=1e-9)
    assert a[2, 4] == pytest.approx(180.0, abs=1e-5)
    np.testing.assert_allclose(a, a.T)
    # a zero gradient has no direction: NaN, not the 90 degrees ("orthogonal") a cosine of 0 gives
    z = gradient_angles.angle_matrix(np.stack([u[0], np.zeros(30), u[1]]))
    assert np.isnan(z[1]).all() and np.isnan(z[:, 1]).all() and z[0, 2] == pytest.approx(90.0, abs=1e-9)
    g = torch.arange(12.0).reshape(3, 4)  # [out, in]
    assert gradient_angles.reduce_gradient(g).tolist() == [4.0, 5.0, 6.0, 7.0]  # mean over the output dimension


def test_head_gradients_sum_to_the_gradient_of_the_eq6_loss():
    """Linearity: per-head gradients (reduced) add up to the reduced gradient of the expert's own loss."""
    from siren.config import load_config
    from siren.model import Expert, ModelConfig, presets
    from tests.fixtures_model import code_batch, synthetic_tables, text_batch

    cfg = load_config(ModelConfig, ["scale=tiny", "distribution=1-12", "conditioning=none", "dim=32",
                                    "attn_heads=2", "codec=synthetic"], presets())
    torch.manual_seed(0)
    expert = Expert(cfg, 0, synthetic_tables())
    text, tmask = text_batch(B=2)
    codes = code_batch(B=2, T=5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    batch = {"codes": codes, "frame_mask": mask, "text": text, "text_mask": tmask}
    name, w = gradient_angles.resolve_param(expert, "backbone.blocks.-1.mlp.down.weight")
    assert name == f"backbone.blocks.{cfg.main_layers - 1}.mlp.down.weight"
    # an index past the first block, or a negative index on what is not a list of blocks, is named as such
    for bad, words in ((f"backbone.blocks.-{cfg.main_layers + 1}.mlp.down.weight", f"has {cfg.main_layers} blocks"),
                       ("backbone.nope.-1.weight", "'backbone.nope' is not a list of blocks")):
        with pytest.raises(ConfigError, match=words):
            gradient_angles.resolve_param(expert, bad)
    per_head = gradient_angles.head_gradients(expert, batch, w)
    assert per_head.shape == (12, w.shape[1])
    total = torch.autograd.grad(expert.loss(batch, reduction="sum").loss, w)[0]  # the heads' losses summed
    torch.testing.assert_close(per_head.sum(0), gradient_angles.reduce_gradient(total).double(), rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------- semantic probe

def test_probe_separable_layer_is_perfect_and_shuffled_labels_are_chance():
    n_classes, d = 4, 16
    means = 10.0 * orthonormal(n_classes, d)
    y_tr, y_te = np.repeat(np.arange(n_classes), 30), np.repeat(np.arange(n_classes), 50)
    x_tr = means[y_tr] + 0.3 * rng(1).standard_normal((len(y_tr), d))
    x_te = means[y_te] + 0.3 * rng(2).standard_normal((len(y_te), d))
    assert semantic_probe.probe_accuracy(x_tr, y_tr, x_te, y_te, hidden=32, max_iter=300) >= 0.99
    shuffled = rng(3).permutation(y_tr)
    acc = semantic_probe.probe_accuracy(x_tr, shuffled, x_te, y_te, hidden=32, max_iter=300)
    assert acc < 0.5  # chance is 0.25; 200 test clips put a separable fit far above 0.5
    pts = semantic_probe.tsne(x_te, perplexity=30, seed=0)
    assert pts.shape == (len(x_te), 2) and np.isfinite(pts).all()


# ---------------------------------------------------------------------------- convergence / Table 5

def write_jsonl(path: Path, rows: list[dict], tail: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def test_loss_stats_equal_hand_computation(tmp_path):
    run = tmp_path / "run"
    # Two experts owning layers 1-6 and 7-12 (a "2-6" run); 20 logged steps each.
    for k in range(2):
        rows = []
        for step in range(1, 21):
            rows.append({"step": step, "loss": 0.0, **{f"ce/L{j}": float(j * 100 + step)
                                                        for j in range(6 * k + 1, 6 * k + 7)}})
            rows.append({"step": step, "val": True, **{f"ce/L{j}": -1.0 for j in range(6 * k + 1, 6 * k + 7)}})
        # a resumed job logged step 20 again (the later entry wins) and was killed mid-line
        rows.append({"step": 20, **{f"ce/L{j}": float(j * 100 + 30) for j in range(6 * k + 1, 6 * k + 7)}})
        write_jsonl(run / f"expert_{k}" / "log.jsonl", rows, tail='{"step": 21, "ce/L')
    # final = mean of the last ceil(0.1 * 20) = 2 entries: steps 19 and 20 (20 re-logged as j*100 + 30)
    final = {j: (j * 100 + 19 + j * 100 + 30) / 2 for j in range(1, 13)}
    stats = convergence.loss_stats(run)
    assert stats["final"] == pytest.approx(final)
    assert stats["loss_mean"] == pytest.approx(sum(final.values()) / 12)
    assert stats["loss_ratio"] == pytest.approx(final[12] / final[1])
    assert convergence.loss_stats(run, tail=1.0)["final"][3] == pytest.approx(
        (sum(300 + s for s in range(1, 20)) + 330) / 20)
    # a fractional tail rounds up: ceil(0.12 * 20) = 3 entries
    assert convergence.loss_stats(run, tail=0.12)["final"][3] == pytest.approx((318 + 319 + 330) / 3)
    assert convergence.loss_stats(run, split="val")["loss_mean"] == pytest.approx(-1.0)
    # an expert stopped early (its log ends at step 5) printed Table 5's numbers from its step 5 beside step 20's
    full = (run / "expert_1" / "log.jsonl").read_text()
    (run / "expert_1" / "log.jsonl").write_text("".join(full.splitlines(True)[:10]))
    with pytest.raises(DataError, match=r"the experts' logs end at different steps \(train logs end at step 5 for "
                                        r"layers 7-12, step 20 for layers 1-6\): Table 5's final CEs"):
        convergence.loss_stats(run)
    (run / "expert_1" / "log.jsonl").write_text(full)
    from siren import checkpoint as ckpt  # logs ending together, but an expert's checkpoint says it is unfinished

    ckpt.save(run / "expert_0", 20, {"w": torch.zeros(1)}, {}, {"train": {"steps": 200}, "finished": False}, 2)
    with pytest.raises(DataError, match=r"expert 0 is unfinished \(step 20 of 200\) \(train logs end at step 20 for "
                                        r"layers 1-12\)"):
        convergence.loss_stats(run)
    ckpt.save(run / "expert_0", 200, {"w": torch.zeros(1)}, {}, {"train": {"steps": 200}, "finished": True}, 2)
    assert convergence.loss_stats(run)["final"] == pytest.approx(final)
    latest = (run / "expert_0" / "latest").read_text()
    (run / "expert_0" / "latest").write_text("step_00000999\n")  # names a missing folder: a DataError, not a crash
    with pytest.raises(DataError, match=r"expert 0: .*step_00000999"):
        convergence.loss_stats(run)
    (run / "expert_0" / "latest").write_text(latest)
    # a layer owned by two experts, and a missing layer, are errors naming the problem
    write_jsonl(run / "expert_2" / "log.jsonl", [{"step": 1, "ce/L12": 1.0}])
    with pytest.raises(DataError, match="layer 12 is logged by expert_1 and expert_2"):
        convergence.loss_stats(run)
    (run / "expert_2" / "log.jsonl").unlink()
    (run / "expert_1" / "log.jsonl").unlink()
    with pytest.raises(DataError, match=r"layers \[7, 8, 9, 10, 11, 12\]"):
        convergence.loss_stats(run)


def test_non_finite_validation_ce_is_said_not_silently_dropped(tmp_path, caplog):
    """Training stops on a non-finite loss, but a validation value can be NaN: it was skipped without a word,
    so a diverged layer's last values read as converged."""
    rows = [{"step": s, "val": True, **{f"ce/L{j}": (float("nan") if (j, s) == (3, 2) else 1.0)
                                       for j in range(1, 13)}} for s in (1, 2)]
    write_jsonl(tmp_path / "run" / "expert_0" / "log.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="analysis.convergence"):
        curves = convergence.layer_curves(tmp_path / "run", "val")
    assert list(curves[3][0]) == [1] and "non-finite val CE left out of the curves (layer: entries) 3: 1" in caplog.text


def test_ema_and_as_list():
    assert style.ema(np.full(5, 2.0), 0.9) == pytest.approx(np.full(5, 2.0))  # bias-corrected: no warm-up dip
    # by hand: acc = 0.5, 0.25; divided by 1 - 0.5^t = 0.5, 0.75
    assert style.ema(np.array([1.0, 0.0]), 0.5) == pytest.approx([1.0, 1 / 3])
    assert style.ema(np.array([1.0, 0.0]), 0.5, np.array([1, 2])) == pytest.approx([1.0, 1 / 3])
    # the weight is per step: an entry 10 steps on stands for 10 steps of its value (as if logged at each one),
    # so entries logged every 10 steps, plus a step logged between, are not taken as evenly spaced
    sparse = style.ema(np.array([1.0, 0.0, 0.0]), 0.9, np.array([10, 13, 20]))
    dense = style.ema(np.repeat([1.0, 0.0, 0.0], [10, 3, 7]), 0.9)
    assert sparse == pytest.approx(dense[[9, 12, 19]])
    assert as_list("[a, b/c ,d]") == ["a", "b/c", "d"] and as_list("x,y") == ["x", "y"] and as_list("") == []


@pytest.mark.parametrize("width", [style.COLUMN, style.TWO_COLUMN])
def test_a_long_figure_note_wraps_instead_of_widening_the_image(tmp_path, width):
    """The note is drawn under the plot; one long line (the demo text encoder's label) widened the saved image
    (savefig.bbox tight) to twice the figure, the plot squeezed into its left half. Wrapped, the image keeps the
    figure's width and the note stays below the x label."""
    long_note = "codec: demo weights (trained on the embedded set); text: demo weights " * 4
    fig, ax = style.figure(width)
    ax.plot([0, 1], [0, 1])
    ax.set_xlabel("step")
    style.note(fig, long_note)
    fig.canvas.draw()
    note_box = fig.texts[0].get_window_extent()
    label_box = ax.xaxis.label.get_window_extent()
    png = style.save_figure(fig, tmp_path, "f")[1]
    image_width = plt.imread(png).shape[1]
    assert image_width <= 1.02 * width * style.DPI, (image_width, width * style.DPI)
    assert note_box.y1 <= label_box.y0 and note_box.height > 2 * style.NOTE_SIZE  # below the label, several lines


@pytest.mark.parametrize("probe, key", [(rvq_depth, "depths"), (rvq_depth, "gen_r"), (semantic_probe, "panels"),
                                        (convergence, "panels"), (continuous_recon, "dims")])
def test_a_list_of_numbers_with_a_word_in_it_is_refused_by_its_key(probe, key, tmp_path):
    """Each probe's whole-number lists go through int_list: 'x' is an error naming the key, not a traceback
    (checked before any data, run or codec is opened)."""
    assert int_list("[1, 4,8]", "k") == [1, 4, 8] and int_list("", "k") == []
    schema = next(v for k, v in vars(probe).items() if k.endswith("Config") and isinstance(v, type)
                  and v.__module__ == probe.__name__)
    with pytest.raises(ConfigError, match=f"{key}=1,x: give whole numbers"):
        probe_main(probe.__name__.split(".")[1], schema, probe.run, [f"{key}=1,x", f"out={tmp_path}"])


@pytest.mark.parametrize("probe, arg", [
    (continuous_recon, "train_per_class=0"), (convergence, "tail=2"), (convergence, "smooth=1"),
    (gradient_angles, "batches=0"), (gradient_angles, "crop_s=-1"), (orthogonality, "max_clips=-1"),
    (reward_curves, "smooth=-0.1"), (rvq_depth, "seconds=-1"), (rvq_depth, "max_clips=-2"),
    (semantic_probe, "max_clips=-1"), (semantic_probe, "tsne_perplexity=0"), (task_vectors, "reference_step=-5")])
def test_out_of_range_numbers_are_refused_by_key(probe, arg):
    """max_clips=-1 or seconds=-1 ran as 0 (all clips, whole clips) without a word; now each is refused."""
    schema = next(v for k, v in vars(probe).items() if k.endswith("Config") and isinstance(v, type)
                  and v.__module__ == probe.__name__)
    with pytest.raises(ConfigError, match=arg.split("=")[0]):
        load_config(schema, [arg])


def test_semantic_probe_refuses_a_panel_past_layer_12_before_probing(tmp_path):
    with pytest.raises(ConfigError, match=r"panels=1,13: give the layers .* each in 1..12 \(\[13\] do not exist\)"):
        probe_main("semantic_probe", semantic_probe.SemanticProbeConfig, semantic_probe.run,
                   ["panels=1,13", "data=/nonexistent", f"out={tmp_path}"])  # the data is never opened
    with pytest.raises(ConfigError, match=r"panels=: give the layers of the Fig. 2c panel"):  # crashed after probing
        probe_main("semantic_probe", semantic_probe.SemanticProbeConfig, semantic_probe.run,
                   ["panels=", "data=/nonexistent", f"out={tmp_path}"])


@pytest.mark.parametrize("probe", [semantic_probe, orthogonality])
def test_a_feature_space_typo_is_named_before_the_data_is_read(probe, tmp_path):
    # it was named after the demo set was prepared (45 s on a fresh cache)
    name = probe.__name__.rpartition(".")[2]
    schema = semantic_probe.SemanticProbeConfig if probe is semantic_probe else orthogonality.OrthogonalityConfig
    with pytest.raises(ConfigError, match="features must be one of projected, codebook, got 'foo'"):
        probe_main(name, schema, probe.run, ["features=foo", "data=/nonexistent", f"out={tmp_path}"])


@pytest.mark.parametrize("splits", ["", "train,train"])
def test_orthogonality_refuses_no_split_or_one_given_twice(splits, tmp_path):
    """splits= was a StopIteration traceback; train,train pooled every clip twice (and could pair a clip with its
    own copy as the 'other sample' baseline)."""
    with pytest.raises(ConfigError, match=f"splits={splits}: give each prepared split to pool once"):
        probe_main("orthogonality", orthogonality.OrthogonalityConfig, orthogonality.run,
                   [f"splits={splits}", "data=/nonexistent", f"out={tmp_path}"])


def test_corrupt_log_line_is_named(tmp_path):
    p = write_jsonl(tmp_path / "log.jsonl", [{"step": 1}], tail="garbage\n" + json.dumps({"step": 2}) + "\n")
    with pytest.raises(DataError, match="log.jsonl:2"):
        read_jsonl(p)
    (tmp_path / "results.json").write_text(json.dumps({"metrics": {"fd": 12.5, "clap": 24.1}, "fd": 99}))
    assert metric_of(read_results(tmp_path), "fd") == 12.5 and metric_of(read_results(tmp_path), "FD") is None
    assert read_results(tmp_path / "nothing") is None


def test_rvq_depth_reads_generation_fd_by_default(tmp_path, caplog):
    """results.json's keys are lower case; the default gen_metric was "FD", so every run given was left out of
    Fig. 1b with a warning. The runs are read before the data, which here does not exist."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps({"metrics": {"fd": 12.5}}))
    for metric in ("fd", "FD", "clap"):  # clap: a metric the file lacks, the control that the warning can come
        caplog.clear()
        with caplog.at_level(logging.WARNING), pytest.raises((ConfigError, DataError)):
            rvq_depth.run(rvq_depth.RvqDepthConfig(data=str(tmp_path / "none"), gen_runs=str(tmp_path / "run"),
                                                   gen_r="12", out=str(tmp_path / "out"),
                                                   **({} if metric == "fd" else {"gen_metric": metric})))
        assert ("left out of the figure" in caplog.text) == (metric == "clap"), metric
    # an evaluation of a harness run (ckpt=) is of a 12-layer model: another r was plotted as given
    (tmp_path / "run" / "results.json").write_text(json.dumps({"metrics": {"fd": 12.5},
                                                               "config": {"ckpt": "runs/x", "gen_dir": ""}}))
    with pytest.raises(ConfigError, match=r"gen_r=4 for .*run: its results.json is an evaluation of the harness "
                                          r"run runs/x, whose models decode all 12 layers"):
        rvq_depth.run(rvq_depth.RvqDepthConfig(data=str(tmp_path / "none"), gen_runs=str(tmp_path / "run"),
                                               gen_r="4", out=str(tmp_path / "out")))
    # a mistyped run was a warning ("no 'fd' in results.json") and a figure without it; r = 0 was drawn at 0
    with pytest.raises(DataError, match=r"gen_runs: .*nowhere holds no results.json"):
        rvq_depth.run(rvq_depth.RvqDepthConfig(data=str(tmp_path / "none"), gen_runs=str(tmp_path / "nowhere"),
                                               gen_r="12", out=str(tmp_path / "out")))
    with pytest.raises(ConfigError, match=r"gen_r=0: each r must be in 1..12"):
        rvq_depth.run(rvq_depth.RvqDepthConfig(data=str(tmp_path / "none"), gen_runs=str(tmp_path / "run"),
                                               gen_r="0", out=str(tmp_path / "out")))


def test_probe_commands_run_under_the_one_shell(tmp_path):
    """`python -m analysis.<probe>` as every command of the harness: bad input is one `error:` line naming
    it, exit code 2, no traceback; --help lists the keys with their defaults."""
    def probe(*args):  # the module as __main__, in this process (an uncaught exception fails the test)
        return run_as_main("analysis.convergence", *args)

    code, _, err = probe(f"run={tmp_path / 'nowhere'}")
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith(f"error: {tmp_path / 'nowhere'}: no expert_<k>/log.jsonl"), err
    write_jsonl(tmp_path / "run" / "expert_0" / "log.jsonl", [{"step": 1, "ce/L1": 6.9}],
                tail="garbage\n" + json.dumps({"step": 2}) + "\n")
    code, _, err = probe(f"run={tmp_path / 'run'}", f"out={tmp_path / 'out'}")
    assert code == 2 and "log.jsonl:2: not a JSON object" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "out").exists()  # nothing half-written
    code, _, err = probe("splitt=val")
    assert code == 2 and "Did you mean split" in err, err
    code, shown, _ = probe("--help")
    assert code == 0 and "usage: python -m analysis.convergence" in shown
    assert "split='train'" in shown and "tail=0.1" in shown


def test_weights_note_says_demo_weights_once_per_model(tmp_path):
    """A run's figure note names each non-pretrained model once, in the probes' phrasing (the codec
    records its demo label as "weights", the text encoder the bare mode)."""
    from siren.codec import DEMO_LABEL, Codec, CodecConfig
    from siren.demo_weights import TEXT_LABEL
    from siren.frontends import codec_entry, text_entry

    text = {"id": "t", "weights": "demo", "config": {"weights": "demo", "seed": 0, "max_length": 77}}
    cfg = {"codec": codec_entry(Codec(CodecConfig(weights="demo"))), "text": text_entry(text)}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    # the demo text encoder's states are untrained: its own words, never "trained on the embedded set"
    assert weights_note(tmp_path) == f"codec: {DEMO_LABEL}; text: {TEXT_LABEL}"
    # a stage-2 run names its reward model too, pretrained or not (Figure 5's y-axis is that model's score)
    reward = {"name": "clap", "weights": "demo", "seed": 0}
    (tmp_path / "alignment.json").write_text(json.dumps({"config": {"reward": reward}}))
    assert weights_note(tmp_path) == f"codec and reward (clap): {DEMO_LABEL}; text: {TEXT_LABEL}"
    cfg["text"]["config"]["weights"] = cfg["text"]["weights"] = "random"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert weights_note(tmp_path) == f"codec and reward (clap): {DEMO_LABEL}; RANDOM text weights"
    reward["weights"] = "pretrained"
    (tmp_path / "alignment.json").write_text(json.dumps({"config": {"reward": reward}}))
    assert weights_note(tmp_path) == f"codec: {DEMO_LABEL}; RANDOM text weights; pretrained reward (clap) weights"
    assert weights_note(tmp_path / "missing") == "weights unknown (missing has no config.json)"
    del cfg["text"]  # a run config without the text encoder's entry: not taken for pretrained
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert "text: weights not recorded by the run" in weights_note(tmp_path)
    # asked for pretrained, loaded another file put at its place: the run records the file's label, and the note
    # said "pretrained codec weights" (config.weights, what was asked); the reward's recorded label likewise
    cfg["codec"] = {**cfg["codec"], "weights": "file /x/weights_16khz.pth", "config": {"weights": "pretrained"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    labels = {"reward": "file /x/clap.pt", "text": "random", "codec": "file /x/weights_16khz.pth"}
    (tmp_path / "alignment.json").write_text(json.dumps({"config": {"reward": reward}, "weights_labels": labels}))
    note = weights_note(tmp_path)
    assert "codec: weights from /x/weights_16khz.pth" in note and "reward (clap): weights from /x/clap.pt" in note
    assert "pretrained" not in note


# ---------------------------------------------------------------------------- task vectors

def test_task_vector_cosines_identical_orthogonal_and_grouping(tmp_path):
    shapes = {"embedding.weight": (12, 4, 6), "heads.0.weight": (8, 4), "backbone.blocks.0.mlp.up.weight": (5, 4),
              "backbone.blocks.1.mlp.up.weight": (5, 4), "backbone.norm.weight": (4,),
              "embedding.codebooks": (12, 3, 2)}
    init = {k: torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, (k, s) in enumerate(shapes.items())}
    n = sum(math.prod(s) for k, s in shapes.items() if k != "embedding.codebooks")
    basis = torch.as_tensor(orthonormal(3, n), dtype=torch.float64)

    def finals(direction: torch.Tensor, scale: float) -> dict:
        out, o = {}, 0
        for k, t in init.items():
            if k == "embedding.codebooks":  # a frozen buffer: unchanged
                out[k] = t.clone()
                continue
            out[k] = t.double() + scale * direction[o:o + t.numel()].view(t.shape)
            o += t.numel()
        return out

    def cosines(finals: list[dict], inits: list[dict]) -> dict:  # through safetensors files, as the command reads
        with contextlib.ExitStack() as files:
            opened = []
            for i, sd in enumerate(finals + inits):
                save_file(sd, tmp_path / f"{i}.safetensors")
                opened.append(files.enter_context(safe_open(str(tmp_path / f"{i}.safetensors"), "pt")))
            return task_vectors.module_cosines(task_vectors.task_vectors(opened[:len(finals)], opened[len(finals):]))

    # experts 0 and 1: the same update direction (other length); expert 2: an orthogonal one
    ends = [finals(basis[0], 1.0), finals(basis[0], 5.0), finals(basis[1], 1.0)]
    taus = [{k: f[k].double() - init[k].double() for k in init} for f in ends]  # independent of the command's
    cos = cosines(ends, [init] * 3)
    # The orthogonality of basis[0] and basis[1] holds over ALL tensors, not per module: check the
    # per-module values against an independent concatenation instead, and the identical pair against 1.
    assert set(cos) == {("embedding", "all"), ("classifier", "all"), ("backbone", "0"), ("backbone", "1"),
                        ("backbone", "io")}  # the frozen buffer is left out
    for mod, c in cos.items():
        names = [k for k in init if task_vectors.module_of(k) == mod]
        flat = [torch.cat([t[k].flatten() for k in names]) for t in taus]
        ref = float(flat[0] @ flat[2] / (flat[0].norm() * flat[2].norm()))
        assert c[0, 1] == pytest.approx(1.0, abs=1e-12) and c[0, 2] == pytest.approx(ref, abs=1e-12)
    # updates orthogonal module by module give exactly 0
    per_module = {"embedding.weight": 0, "heads.0.weight": 1}
    a = {k: torch.zeros(shapes[k], dtype=torch.float64) for k in per_module}
    b = {k: torch.zeros(shapes[k], dtype=torch.float64) for k in per_module}
    for k in per_module:
        a[k].view(-1)[0], b[k].view(-1)[1] = 1.0, 2.0
    cos = cosines([a, b], [{k: torch.zeros_like(v) for k, v in a.items()}] * 2)
    assert cos[("embedding", "all")][0, 1] == 0.0 and cos[("classifier", "all")][0, 1] == 0.0
    assert task_vectors.module_of("decoder.blocks.3.mlp.down.weight") == ("decoder", "3")
    assert task_vectors.module_of("decoder.pos") == ("decoder", "io")


# ---------------------------------------------------------------------------- rvq depth measures

def test_reconstruction_measures_closed_forms():
    t = torch.arange(8000) / 16000
    ref = 0.5 * torch.sin(2 * math.pi * 440 * t) + 0.1 * torch.randn(8000, generator=torch.Generator().manual_seed(0))
    assert rvq_depth.log_spectral_distance(ref, ref) == pytest.approx(0.0, abs=1e-9)
    assert rvq_depth.mel_l1(ref, ref) == pytest.approx(0.0, abs=1e-9)
    # a gain a changes every power bin by a^2: LSD = |20 log10 a| dB exactly
    assert rvq_depth.log_spectral_distance(ref, 0.5 * ref) == pytest.approx(20 * math.log10(2), rel=1e-4)
    assert rvq_depth.si_snr(ref, 3.0 * ref) > 100  # scale-invariant
    assert rvq_depth.rms_ratio(ref, 0.5 * ref) == pytest.approx(0.5)
    assert rvq_depth.rms_ratio(ref, -ref) == pytest.approx(1.0)
    noise = torch.randn(8000, generator=torch.Generator().manual_seed(1)).double()
    r = ref.double() - ref.double().mean()
    noise = noise - noise.mean()
    noise = noise - (noise @ r) / (r @ r) * r  # orthogonal to the reference
    noise = noise * (r.norm() / noise.norm()) / 10  # 20 dB below
    assert rvq_depth.si_snr(ref.double(), ref.double() + noise) == pytest.approx(20.0, abs=1e-6)


def test_decode_depths_match_dac_quantizer(codec):
    """x-hat_r from summed f-hat^j equals DAC's own decode of the first r code layers."""
    codes = torch.randint(0, 1024, (1, 12, 4), generator=torch.Generator().manual_seed(0))
    out = rvq_depth.decode_depths(codec, codes[0], [1, 5, 12])
    torch.testing.assert_close(out[2], codec.decode(codes)[0], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        z5, _, _ = codec.dac.quantizer.from_codes(codes[:, :5])
        ref5 = codec.dac.decode(z5)[0, 0]
    torch.testing.assert_close(out[1, : ref5.shape[-1]], ref5, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- end to end on demo data

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return prepare_demo(tmp_path_factory.mktemp("analysis-demo"))


@pytest.fixture(scope="module")
def codec():
    from analysis.prepared import build_codec

    return build_codec("random")  # the instance the probes of this process share


@pytest.fixture
def figure_texts(monkeypatch):
    """Every text drawn on each saved figure (the real save_figure still writes the files)."""
    seen = {}
    real = style.save_figure

    def spy(fig, out_dir, name):
        seen[name] = " | ".join(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))
        return real(fig, out_dir, name)

    monkeypatch.setattr(style, "save_figure", spy)
    return seen


def check_outputs(written: list[Path], figures: list[str]):
    folder = written[0].parent
    for name in figures:
        for ext in ("pdf", "png"):
            assert (folder / f"{name}.{ext}").stat().st_size > 1000, f"{name}.{ext}"
    assert all(p.stat().st_size > 0 for p in written)
    assert json.loads((folder / "config.json").read_text())["probe"]
    assert not list(folder.glob(".*.tmp"))


def test_orthogonality_command(demo, tmp_path, figure_texts, capsys):
    out = tmp_path / "orth"
    written = probe_main("orthogonality", orthogonality.OrthogonalityConfig, orthogonality.run,
                         [f"data={demo}", f"out={out}"])
    check_outputs(written, ["fig2a_interval", "fig8_pairs", "matrix"])
    assert "RANDOM codec weights" in figure_texts["fig2a_interval"]
    m = pd.read_csv(out / "matrix.csv")
    assert len(m) == 144 and np.allclose(m.query("j1 == j2")["mean"], 1.0)
    pairs = pd.read_csv(out / "cosines.csv")
    assert len(pairs) == 45 * 66 and set(pairs["weights"]) == {"random"}  # 30 train + 15 test clips
    printed = capsys.readouterr().out
    assert f"wrote {len(written)} files to {out}" in printed and "RANDOM weights)" in printed
    assert "(the same layers of two different samples: " in printed  # the baseline the figure draws in grey
    by = pd.read_csv(out / "by_interval.csv")
    assert by["baseline_abs_mean"].between(0, 1).all() and by["abs_mean"].between(0, 1).all()
    written = probe_main("orthogonality", orthogonality.OrthogonalityConfig, orthogonality.run,
                         [f"data={demo}", f"out={out}", "pool=frame", "features=codebook", "splits=test"])
    assert len(pd.read_csv(out / "cosines.csv")) == 15 * 10 * 66  # 15 clips x 10 frames
    # a draw of max_frames takes each clip's chosen frames as they are computed: the frames of the whole draw
    codec, codes = prepared.open_codec(demo, ["test"], "random"), prepared.load(demo, "test").codes
    every = prepared.frame_features(codec, codes, "codebook")
    keep = np.sort(np.random.default_rng(3).permutation(len(every))[:37])
    assert np.array_equal(prepared.frame_features(codec, codes, "codebook", keep), every[keep])
    for bad in (keep[::-1], np.array([0, len(every)])):  # unsorted, or past the end: named, not misassigned
        with pytest.raises(ValueError, match="sorted frame indices"):
            prepared.frame_features(codec, codes, "codebook", bad)
    with pytest.raises(ConfigError, match="unknown config key 'pooling'.*Valid keys: codec, data"):
        probe_main("orthogonality", orthogonality.OrthogonalityConfig, orthogonality.run, ["pooling=time"])


def test_semantic_probe_command(demo, tmp_path, figure_texts, capsys):
    out = tmp_path / "probe"
    written = probe_main("semantic_probe", semantic_probe.SemanticProbeConfig, semantic_probe.run,
                         [f"data={demo}", f"out={out}", "max_iter=50", "hidden=16"])
    check_outputs(written, ["fig2c_tsne", "fig9_tsne", "accuracy"])
    acc = pd.read_csv(out / "accuracy.csv")
    assert acc["layer"].tolist() == list(range(1, 13)) and acc["top1"].between(0, 1).all()
    assert set(acc["n_classes"]) == {15} and set(acc["n_test"]) == {15}
    assert "RANDOM codec weights" in figure_texts["fig9_tsne"] and "layer 12:" in figure_texts["fig9_tsne"]
    tsne_rows = pd.read_csv(out / "tsne.csv")  # with the codec's weights, as accuracy.csv (it had none)
    assert len(tsne_rows) == 12 * 15 and set(tsne_rows["weights"]) == set(acc["weights"]) == {"random"}
    printed = capsys.readouterr().out
    assert "tested on 15, 15 classes (chance 6.7%); codec dac16k-random-seed0, RANDOM weights" in printed


def test_semantic_probe_refuses_a_split_it_cannot_be_read_against_chance(demo):
    # a test class absent from train (never predictable; chance came from train) or test clips that are train clips
    # (scored on what the probe memorised) gave a number without a word
    from analysis import prepared

    train, test = prepared.load(demo, "train"), prepared.load(demo, "test")
    semantic_probe.check_split(train, test, "test.json")  # the demo splits: every class in both, no file shared
    one_class = [i for i in train.index if train.dataset.items[i]["label"] == train.labels[0]]
    with pytest.raises(DataError, match="test.json: test classes .* have no train clip among the max_clips drawn"):
        semantic_probe.check_split(prepared.Items(train.dataset, one_class, []), test, "test.json")
    with pytest.raises(DataError, match=r"test.json: 30 test clip\(s\) have the same audio file as a train clip"):
        semantic_probe.check_split(train, train, "test.json")


def test_rvq_depth_command(demo, tmp_path, figure_texts, capsys):
    out = tmp_path / "depth"
    written = probe_main("rvq_depth", rvq_depth.RvqDepthConfig, rvq_depth.run,
                         [f"data={demo}", f"out={out}", "max_clips=2", "depths=[1,12]", "seconds=0.2"])
    check_outputs(written, ["fig1b_rvq_depth"])
    rec = pd.read_csv(out / "reconstruction.csv")
    assert rec["r"].tolist() == [1, 12] and np.isfinite(rec[["lsd_db", "mel_l1", "si_snr_db"]]).all().all()
    assert "generation quality: no results given" in figure_texts["fig1b_rvq_depth"]
    assert "RANDOM codec weights" in figure_texts["fig1b_rvq_depth"]
    printed = capsys.readouterr().out
    assert "no results given" in printed and "of 2 clips; codec dac16k-random-seed0, RANDOM weights" in printed
    change = pd.read_csv(out / "depth_change.csv").set_index("metric")
    assert set(change.index) == {"lsd_db", "mel_l1", "si_snr_db"} and (change["n_clips"] == 2).all()
    per = pd.read_csv(out / "per_clip.csv").pivot(index="id", columns="r", values="mel_l1")
    assert change.loc["mel_l1", "mean_change"] == pytest.approx((per[12] - per[1]).mean())
    assert "r=1 -> r=12: mel_l1" in printed
    assert (pd.read_csv(out / "per_clip.csv")["rms_ratio"] > 0).all()
    # every CSV says what made its numbers (per_clip.csv and depth_change.csv said nothing)
    assert set(pd.read_csv(out / "per_clip.csv")["weights"]) == set(change["weights"]) == {"random"}
    # generation quality read from an evaluation with RANDOM metric networks: the curve says so
    (tmp_path / "gen12").mkdir()
    (tmp_path / "gen12" / "results.json").write_text(json.dumps({"metrics": {"fd": 900.0},
                                                                  "card": {"weights": "random"}}))
    probe_main("rvq_depth", rvq_depth.RvqDepthConfig, rvq_depth.run,
               [f"data={demo}", f"out={out}", "max_clips=2", "depths=[1,12]", "seconds=0.2",
                f"gen_runs=[{tmp_path / 'gen12'}]", "gen_r=[12]"])
    assert pd.read_csv(out / "generation.csv").to_dict("records") == [{"r": 12, "metric": "fd", "value": 900.0,
                                                                       "weights": "random"}]
    assert "RANDOM metric weights" in figure_texts["fig1b_rvq_depth"]
    ceiling = pd.read_csv(out / "ceiling.csv")  # the decoder's limit: the unquantized latent decoded
    assert len(ceiling) == 1 and np.isfinite(ceiling[["lsd_db", "mel_l1", "si_snr_db"]]).all().all()
    assert "decoder ceiling (no RVQ)" in figure_texts["fig1b_rvq_depth"] and "r=no RVQ: LSD" in printed


def test_rvq_depth_leaves_out_a_clip_too_short_for_its_stft(demo, tmp_path, monkeypatch, caplog):
    """prepare keeps a clip shorter than a codec frame with a warning; its 100 samples broke the STFT's reflect
    padding with a traceback after the clips before it were decoded, and nothing was written."""
    from analysis import prepared

    real = prepared.Items.waveform
    monkeypatch.setattr(prepared.Items, "waveform", lambda self, n: real(self, n)[:100] if n == 0 else real(self, n))
    with caplog.at_level(logging.WARNING, logger="analysis.rvq_depth"):
        rvq_depth.run(rvq_depth.RvqDepthConfig(data=str(demo), out=str(tmp_path / "d"), max_clips=2, depths="[1,12]",
                                               seconds=0.2))
    assert "1 clip(s) of 2 left out: at most 256 samples of audio" in caplog.text
    assert (pd.read_csv(tmp_path / "d" / "reconstruction.csv")["n_clips"] == 1).all()


def test_rvq_depth_refuses_audio_changed_since_prepare(demo):
    """The reference was read from the source file as it is now: a file replaced after prepare was scored against
    the codes of the old one (LSD 62 -> 27 dB at r=1, the trend over r reversed), without a word."""
    from analysis import prepared

    items = prepared.load(demo, "test", max_items=1)
    items.dataset.items = list(items.dataset.items)  # its dicts, to edit one (the dataset decodes each read anew)
    items.dataset.items[items.index[0]]["source_sha256"] = "0" * 64  # as a replaced file hashes
    with pytest.raises(DataError, match=r"changed since prepare encoded it .* prepare .* again"):
        items.waveform(0)


def test_rvq_depth_refuses_a_moved_source_before_decoding(demo, tmp_path, monkeypatch):
    """A source file moved since prepare was a FileNotFoundError traceback at its clip, the clips decoded before it
    lost; now one error naming it before any decoding."""
    from analysis import prepared

    items = prepared.load(demo, "test")
    src = Path(items.dataset.items[items.index[-1]]["source"])
    decoded = []
    monkeypatch.setattr(rvq_depth, "decode_depths", lambda *a: decoded.append(1))
    moved = src.rename(src.with_suffix(".moved"))
    try:
        with pytest.raises(DataError, match=rf"1 audio file\(s\) its items were prepared from are gone \(e.g. {src}\)"):
            rvq_depth.run(rvq_depth.RvqDepthConfig(data=str(demo), out=str(tmp_path / "d"), depths="[1,12]"))
        with pytest.raises(DataError, match=rf"{src}: the audio prepare encoded cannot be read .*put it back"):
            items.waveform(len(items.index) - 1)
    finally:
        moved.rename(src)
    assert not decoded


def test_depth_change_is_paired_per_clip():
    # clip a improves a lot, b a little, c gets worse: the change is per clip, not of the means
    rows = [dict(id=i, r=r, lsd_db=v, mel_l1=v, si_snr_db=-v)
            for i, (v1, v12) in dict(a=(1.0, 0.4), b=(0.5, 0.45), c=(0.2, 0.35)).items()
            for r, v in ((1, v1), (12, v12))]
    by = {c["metric"]: c for c in rvq_depth.depth_change(rows, 1, 12)}
    d = np.array([-0.6, -0.05, 0.15])
    assert by["mel_l1"]["mean_change"] == pytest.approx(d.mean())
    assert by["mel_l1"]["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(3))
    assert by["mel_l1"]["clips_better"] == 2 and by["si_snr_db"]["clips_better"] == 2  # higher SI-SNR is better
    assert by["si_snr_db"]["mean_change"] == pytest.approx(-d.mean())
    one = rvq_depth.depth_change(rows[:2], 1, 12)[0]
    assert one["n_clips"] == 1 and np.isnan(one["se"])


def test_gradient_angles_command(demo, tmp_path, figure_texts):
    out = tmp_path / "grad"
    written = probe_main("gradient_angles", gradient_angles.GradientAnglesConfig, gradient_angles.run,
                         [f"data={demo}", f"out={out}", "train_steps=0", "batches=2", "batch_size=3",
                          "device=cpu"])
    check_outputs(written, ["fig2b_gradient_angles", "matrix"])
    angles = pd.read_csv(out / "angles.csv")
    assert len(angles) == 2 * 66 and angles["angle_deg"].between(0, 180).all()
    assert "RANDOM codec weights" in figure_texts["fig2b_gradient_angles"]
    assert "model 1-12, none, at initialisation" in figure_texts["fig2b_gradient_angles"]  # not a trained model
    # the baseline: two heads' gradients on two different batches (2 batches x 132 ordered pairs of heads)
    base = pd.read_csv(out / "baseline.csv")
    assert len(base) == 2 * 132 and (base["batch_a"] != base["batch_b"]).all()
    assert (base["head_a"] != base["head_b"]).all()
    assert "two batches (baseline, scaled)" in figure_texts["fig2b_gradient_angles"]
    # every CSV says what made its numbers (matrix.csv said nothing)
    assert set(pd.read_csv(out / "matrix.csv")["codec_weights"]) == set(angles["codec_weights"])


def test_gradient_angles_on_a_trained_single_transformer(demo, run_6_2, tmp_path):
    run = tiny_run(tmp_path / "single-1-12", demo, "1-12", steps=2)
    out = tmp_path / "grad"
    probe_main("gradient_angles", gradient_angles.GradientAnglesConfig, gradient_angles.run,
               [f"run={run}", f"data={demo}", f"out={out}", "batches=1", "batch_size=2", "device=cpu"])
    angles = pd.read_csv(out / "angles.csv")
    assert len(angles) == 66 and set(angles["model"]) == {"1-12, accumulated, 2 training steps"}
    assert len(pd.read_csv(out / "baseline.csv")) == 0  # one batch: no pair of batches, no baseline
    with pytest.raises(ConfigError, match="distribution 6-2; gradient angles need a single transformer"):
        probe_main("gradient_angles", gradient_angles.GradientAnglesConfig, gradient_angles.run,
                   [f"run={run_6_2}", f"data={demo}", f"out={out}"])
    # a run trained with another text encoder than the one that made the split's text states: the gradients
    # would be taken under conditioning the model never saw
    alien = tmp_path / "alien"
    shutil.copytree(run, alien)
    cfg = json.loads((alien / "config.json").read_text())
    cfg["text"]["id"] = "t5-other"
    (alien / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError, match=r"test.json: text .* made this split, but .*alien was trained with text"):
        probe_main("gradient_angles", gradient_angles.GradientAnglesConfig, gradient_angles.run,
                   [f"run={alien}", f"data={demo}", f"out={out}", "split=test"])


def test_gradient_angles_trains_its_fresh_model_on_a_demo_codec_directory(tmp_path):
    """A directory prepared with the demo codec records it by its label; the fresh model's training is given
    the key's value (codec.weights=demo), not the label (which read as a missing weights file)."""
    from siren.data.audio import AudioConfig
    from siren.data.prepare import prepare
    from siren.text import TextConfig, TextEncoder
    from tests.fixtures_data import tiny_set
    from tests.fixtures_model import demo_codec

    m, prep = tiny_set(tmp_path / "src", n=3), tmp_path / "prep"
    for split in ("train", "test"):
        prepare(m, prep, codec=demo_codec(), text_encoder=TextEncoder(TextConfig(weights="random", seed=0)),
                split=split, audio=AudioConfig("pad", 0.4), progress=False)
    out = tmp_path / "grad"
    probe_main("gradient_angles", gradient_angles.GradientAnglesConfig, gradient_angles.run,
               [f"data={prep}", f"out={out}", "train_steps=1", "batches=1", "batch_size=2", "device=cpu"])
    assert len(pd.read_csv(out / "angles.csv")) == 66


@pytest.fixture(scope="module")
def run_6_2(demo, tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("runs") / "siren-6-2", demo, "6-2", steps=3)


def test_convergence_command_on_a_trained_run(run_6_2, tmp_path, figure_texts, caplog):
    out = tmp_path / "conv"
    with caplog.at_level(logging.WARNING):
        written = probe_main("convergence", convergence.ConvergenceConfig, convergence.run,
                             [f"run={run_6_2}", f"out={out}"])
    check_outputs(written, ["fig2d_convergence", "fig6_convergence"])
    assert "RANDOM codec and text weights" in figure_texts["fig6_convergence"]
    # which model and weights made the curves is in the files and the note, and a non-AudioGen model is said
    assert "6-2, conditioning=accumulated" in figure_texts["fig6_convergence"]
    assert "the paper's Fig. 2d / 6 are of AudioGen" in caplog.text
    curves = pd.read_csv(out / "curves.csv")
    assert set(curves["weights"]) == {"codec=random, text=random"}
    assert set(pd.read_csv(out / "loss_stats.csv")["model"]) == {"6-2, conditioning=accumulated"}
    assert sorted(set(curves["layer"])) == list(range(1, 13)) and set(curves["step"]) == {1, 2, 3}
    stats = convergence.loss_stats(run_6_2)
    # independent: the last training entry of each expert's log (tail 10% of 3 entries = 1 entry;
    # the trainer validates at the end, so the very last line is a validation entry)
    logs = [[e for e in read_jsonl(run_6_2 / f"expert_{k}" / "log.jsonl") if not e.get("val")][-1] for k in range(6)]
    last = {j: logs[(j - 1) // 2][f"ce/L{j}"] for j in range(1, 13)}
    assert stats["loss_ratio"] == pytest.approx(last[12] / last[1])
    assert stats["loss_mean"] == pytest.approx(np.mean(list(last.values())))
    assert pd.read_csv(out / "loss_stats.csv")["loss_mean"][0] == pytest.approx(stats["loss_mean"])


def test_convergence_leaves_no_other_runs_table5_numbers_in_its_folder(run_6_2, tmp_path, caplog):
    """A second run into the same out= (every run's default is outputs/analysis/convergence) that computes no Table
    5 numbers left the first run's loss_stats.csv beside its curves; a damaged config.json was a JSONDecodeError."""
    out, unfinished = tmp_path / "conv", shutil.copytree(run_6_2, tmp_path / "unfinished")
    state = unfinished / "expert_3" / "step_00000003" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "finished": False}))
    probe_main("convergence", convergence.ConvergenceConfig, convergence.run, [f"run={run_6_2}", f"out={out}"])
    assert (out / "loss_stats.csv").is_file() and (out / "curves.csv").is_file()
    mine = out / "notes.txt"  # a file of the user's: never touched
    mine.write_text("mine")
    with caplog.at_level(logging.WARNING):
        written = probe_main("convergence", convergence.ConvergenceConfig, convergence.run,
                             [f"run={unfinished}", f"out={out}"])
    assert "no Table 5 numbers" in caplog.text and "removed loss_stats.csv, written by the previous run" in caplog.text
    assert not (out / "loss_stats.csv").exists() and mine.read_text() == "mine"
    assert {p.name for p in written} == set(json.loads((out / "config.json").read_text())["files"])
    (unfinished / "config.json").write_text('{"model": ')
    with pytest.raises(Exception, match=r"corrupt run file .*unfinished/config.json .*restore it from a copy") as e:
        probe_main("convergence", convergence.ConvergenceConfig, convergence.run, [f"run={unfinished}", f"out={out}"])
    assert not isinstance(e.value, json.JSONDecodeError)


def test_a_probe_removes_only_what_its_own_previous_run_listed(tmp_path):
    """remove_stale read the "files" of any config.json in out=: another tool's (or another probe's) listed files
    were deleted."""
    from analysis.cli import remove_stale

    for i, cfg in enumerate(({"name": "my-site", "files": ["index.html"]},
                             {"probe": "rvq_depth", "code_version": "x", "files": ["index.html"]})):
        folder = tmp_path / str(i)
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(cfg))
        (folder / "index.html").write_text("mine")
        remove_stale(folder, "convergence", [folder / "curves.csv"])
        assert (folder / "index.html").read_text() == "mine"
    (folder / "config.json").write_text(json.dumps({"probe": "convergence", "code_version": "x",
                                                    "files": ["index.html", "../outside.txt", "curves.csv"]}))
    (tmp_path / "outside.txt").write_text("mine")
    remove_stale(folder, "convergence", [folder / "curves.csv"])
    assert not (folder / "index.html").exists() and (tmp_path / "outside.txt").read_text() == "mine"


def test_a_probe_records_the_commit_it_started_from_not_its_own_outputs(tmp_path, monkeypatch):
    """code_version was read after the probe wrote: run as the README shows (out=docs/demo/<probe>, tracked files),
    every config.json said "-dirty" because of the probe's own outputs. Here "dirty" is a CSV in out=."""
    import dataclasses

    from analysis import cli as probe_cli

    @dataclasses.dataclass
    class Cfg:
        out: str = ""

    def run(cfg: Cfg) -> list[Path]:
        (Path(cfg.out) / "x.csv").write_text("a\n1\n")
        return [Path(cfg.out) / "x.csv"]

    out = tmp_path / "probe"
    out.mkdir()
    monkeypatch.setattr(probe_cli, "code_version", lambda: "git abc-dirty" if (out / "x.csv").exists() else "git abc")
    probe_main("fake", Cfg, run, [f"out={out}"])
    assert json.loads((out / "config.json").read_text())["code_version"] == "git abc"


def test_task_vectors_refuses_unfinished_missing_or_stage2_experts(run_6_2, tmp_path):
    """App. D.3's task vectors are of one run's finished experts from their shared initialisation: an unfinished
    expert was mixed in, missing ones skipped (and the rest numbered by position in pairs.csv), and a stage-2
    folder's RL updates reported as task vectors."""
    def tv(run, *extra):
        return probe_main("task_vectors", task_vectors.TaskVectorsConfig, task_vectors.run,
                          [f"run={run}", f"out={tmp_path / 'tv'}", *extra])

    run = shutil.copytree(run_6_2, tmp_path / "run")
    state = run / "expert_3" / "step_00000003" / "state.json"
    saved = state.read_text()
    state.write_text(json.dumps({**json.loads(saved), "finished": False}))
    with pytest.raises(Exception, match=r"finished experts of one run .*\n  expert 3: unfinished \(step 3 of 3\)"):
        tv(run)
    state.write_text(saved)
    shutil.rmtree(run / "expert_1")
    with pytest.raises(Exception, match=r"expert 1: missing"):
        tv(run)
    shutil.copytree(run_6_2 / "expert_1", run / "expert_1")
    (run / "alignment.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"is a stage-2 run: .* give init="):
        tv(run)
    tv(run, f"init={run / 'expert_0' / 'init.safetensors'}")  # with the shared initialisation it runs
    assert set(pd.read_csv(tmp_path / "tv" / "pairs.csv")["expert_b"]) == {1, 2, 3, 4, 5}


def test_task_vectors_command_on_a_trained_run(run_6_2, tmp_path, figure_texts):
    out = tmp_path / "tv"
    written = probe_main("task_vectors", task_vectors.TaskVectorsConfig, task_vectors.run,
                         [f"run={run_6_2}", f"out={out}"])
    check_outputs(written, ["fig7_task_vectors"])
    assert "RANDOM codec and text weights" in figure_texts["fig7_task_vectors"]
    pairs = pd.read_csv(out / "pairs.csv")
    assert set(pairs.groupby("module").size()) == {15}  # 6 experts -> 15 pairs per module
    assert set(pd.read_csv(out / "modules.csv")["weights"]) == {"codec=random, text=random"}
    assert {"Embedding", "Classifier", "RVQ Decoder L1", "Backbone L1", "Backbone L2"} <= set(pairs["module"])
    assert pairs["cosine"].between(-1 - 1e-9, 1 + 1e-9).all()
    # the trainer gives every expert the same initialisation (one seed): the recorded inits agree
    from safetensors.torch import load_file

    a, b = (load_file(str(run_6_2 / f"expert_{k}" / "init.safetensors")) for k in (0, 5))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_other_clip_lends_each_caption_once_and_never_within_a_label():
    labels = ["a", "b", "c", "a", "b", "c", "c"]
    partner = caption_reliance.other_clip(labels)
    assert sorted(partner) == list(range(7))
    assert all(labels[i] != labels[partner[i]] for i in range(7))
    unlabelled = caption_reliance.other_clip([None] * 5)
    assert sorted(unlabelled) == list(range(5)) and all(unlabelled[i] != i for i in range(5))
    with pytest.raises(DataError, match=r"label\(s\) \['a'\] hold more than half of the 4 clips"):
        caption_reliance.other_clip(["a", "b", "a", "a"], "test.json")


def test_caption_reliance_command(demo, run_6_2, tmp_path, figure_texts, capsys):
    import siren
    from siren.data import PreparedDataset
    from siren.data.dataset import collate

    out = tmp_path / "cr"
    written = probe_main("caption_reliance", caption_reliance.CaptionRelianceConfig, caption_reliance.run,
                         [f"run={run_6_2}", f"data={demo}", f"out={out}", "batch_size=4", "device=cpu"])
    check_outputs(written, ["caption_reliance"])
    assert "RANDOM codec and text weights" in figure_texts["caption_reliance"]
    assert "6-2, accumulated, 2 blocks per expert" in capsys.readouterr().out
    rows = pd.read_csv(out / "reliance.csv")
    assert set(rows["train"]) == {"seed 0"}  # a run trained on every layer's CE (train.loss_layers=0)
    assert caption_reliance.train_words({"seed": 1, "loss_layers": 2}) == "seed 1, loss over layers 1-2"
    assert caption_reliance.train_words({"seed": 0, "loss_layers": 1}) == "seed 0, loss over layer 1"
    assert set(rows["seed"]) == {0} and set(rows["loss_layers"]) == {0}
    # several seeds: a colour per setting, a line style per seed, each named once in the legend
    two = [{**r, "run": f"{r['run']}-{s}", "seed": s} for s in (0, 1) for r in rows.to_dict("records")]
    fig = caption_reliance.plot(two, "note")
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["6-2, 2 blocks", "seed 0", "seed 1"]
    assert len({line.get_linestyle() for line in fig.axes[0].get_lines()[:-1]}) == 2  # the last: the zero line
    plt.close(fig)
    assert rows["layer"].tolist() == list(range(1, 13)) and set(rows["clips"]) == {15}
    # own-caption CE: the experts' Eq. 6 CE over one batch of the whole split (the probe batches by 4)
    model, ds = siren.load(run_6_2), PreparedDataset(demo, "test", crop_s=None)
    batch = collate([{**ds[i], "codes": ds.codes(i)[:, : ds.items[i]["real_frames"]]} for i in range(len(ds))])
    with torch.no_grad():
        ce = torch.cat([loss.ce for loss in model.loss(batch)])
    np.testing.assert_allclose(rows["ce_own"], ce.numpy(), rtol=1e-5)
    assert rows["gap"].abs().min() > 0  # the trained model's cross-attention reads the text states
    # a model whose text paths are cut scores 0 at every layer: only the caption is swapped
    for expert in model.experts:
        for block in expert.backbone.blocks:
            torch.nn.init.zeros_(block.cross_attn.out.weight)
        torch.nn.init.zeros_(expert.decoder.text_start.weight)
    other = caption_reliance.other_clip(ds.labels)
    clips = caption_reliance.read_clips(ds)
    own = caption_reliance.layer_ce(model, clips, list(range(len(ds))), 0, 4, torch.device("cpu"))
    np.testing.assert_array_equal(caption_reliance.layer_ce(model, clips, other, 0, 4, torch.device("cpu")), own)
    # a run trained with another text encoder than the one that made the directory's text states
    alien = tmp_path / "alien"
    shutil.copytree(run_6_2, alien)
    cfg = json.loads((alien / "config.json").read_text())
    cfg["text"]["id"] = "t5-other"
    (alien / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError, match=r"test.json: text .* made this split, but .*alien was trained with text "
                                        r"t5-other; pass data= the prepared directory the run trained on"):
        probe_main("caption_reliance", caption_reliance.CaptionRelianceConfig, caption_reliance.run,
                   [f"run={alien}", f"data={demo}", f"out={out}"])


def test_reward_curves_command(tmp_path, figure_texts):
    runs = []
    for i, name in enumerate(["rl", "dpo", "causal"]):
        d = tmp_path / name
        write_jsonl(d / "rl" / "log.jsonl", [{"step": s, "reward_mean": 0.01 * s * (2 - i), "loss": 0.0}
                                             for s in range(1, 11)])
        runs.append(str(d))
    (tmp_path / "rl" / "results.json").write_text(json.dumps({"metrics": {"fd": 10.65, "clap": 24.18},
                                                               "card": {"weights": "random"}}))
    out = tmp_path / "fig5"
    written = probe_main("reward_curves", reward_curves.RewardCurvesConfig, reward_curves.run,
                         [f"runs=[{','.join(runs)}]", "labels=[RL,DPO,Causal]", f"out={out}"])
    check_outputs(written, ["fig5_rewards"])
    # the (FD, CLAP) of a RANDOM-backbone evaluation says so on the figure (it read as the reward's pretrained)
    assert "(10.65, 24.18)" in figure_texts["fig5_rewards"] and "RANDOM metric weights" in figure_texts["fig5_rewards"]
    assert "weights unknown (rl has no config.json)" in figure_texts["fig5_rewards"]
    summary = pd.read_csv(out / "summary.csv")
    assert summary["metrics_weights"].fillna("").tolist() == ["random", "", ""]
    assert summary["final_reward"].tolist() == pytest.approx([0.2, 0.1, 0.0])
    assert summary["FD"].isna().tolist() == [False, True, True]
    assert set(summary["weights"]) == {"unknown (no config.json)"}  # said, not left blank as if pretrained
    assert set(pd.read_csv(out / "rewards.csv")["weights"]) == {"unknown (no config.json)"}  # the curve's own rows
    with pytest.raises(ConfigError, match="3 runs but 2 labels"):
        probe_main("reward_curves", reward_curves.RewardCurvesConfig, reward_curves.run,
                   [f"runs=[{','.join(runs)}]", "labels=[a,b]"])


def test_figure5_draws_a_run_whose_evaluation_is_pending(tmp_path, figure_texts):
    """The grid's Figure 5 passed each aligned run's eval/results.json by name, so a run aligned but not yet
    (or never) evaluated made the whole figure an error instead of a curve without its (FD, CLAP). A results.json
    without its done marker (an earlier evaluation, the cell evaluated again now) is not this run's; an itg run is
    labelled itg (it was "no 'fd'/'clap' metric; adjust fd_key="), and the note says the grid's scale."""
    from ablations.figures import reward_curves as grid_curves

    runs = {}
    for name in ("evaluated", "pending", "stale", "itg"):
        write_jsonl(tmp_path / name / "aligned" / "rl" / "log.jsonl", [{"step": s, "reward_mean": 0.1 * s}
                                                                        for s in range(1, 4)])
        runs[name] = tmp_path / name / "aligned"
        if name != "pending":
            (tmp_path / name / "eval").mkdir()
            res = {"status": "itg", "reason": "x", "metrics": {}} if name == "itg" else \
                {"metrics": {"fd": 1.5, "clap": 2.5}}
            (tmp_path / name / "eval" / "results.json").write_text(json.dumps(res))
        if name in ("evaluated", "itg"):
            (tmp_path / name / "eval.done").write_text("{}")
    written = grid_curves(runs, "scale=demo; demo weights (trained on the embedded set)", tmp_path / "fig")
    assert pd.read_csv(tmp_path / "fig" / "summary.csv")["FD"].isna().tolist() == [False, True, True, True]
    texts = figure_texts["fig5_rewards"]
    assert written and "(itg)" in texts and "scale=demo" in texts and "EMA 0.9" in texts
    assert texts.count("(1.50, 2.50)") == 1  # the evaluated run's pair; not the stale one's


def test_reward_curves_end_labels_do_not_overprint():
    """Stage-2 runs draw the same prompts each step, so their curves end close together (Figure 5's demo runs
    within 0.005); their (FD, CLAP) labels are stacked apart, and a label with room keeps its place."""
    curves = [{"label": f"run {i}", "steps": np.arange(1, 5), "reward": np.array([0.2, 0.4, 0.2, 0.3 + d]),
               "pair": f"({1300 + i}.00, 2{i}.00)"} for i, d in enumerate([0.0, 0.002, -0.001])]
    curves.append({"label": "far", "steps": np.arange(1, 5), "reward": np.array([0.2, 0.4, 0.2, -0.2]),
                   "pair": "(1400.00, 10.00)"})
    fig = reward_curves.plot(curves, smooth=0.0)
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in fig.axes[0].texts]
    assert len(boxes) == 4
    points = fig.dpi / 72
    for i in range(4):
        for j in range(i):  # apart by at least 1 pt: at 6.5 pt the parentheses of two stacked labels touched
            assert boxes[i].y0 - boxes[j].y1 >= points or boxes[j].y0 - boxes[i].y1 >= points, \
                (curves[i]["pair"], curves[j]["pair"])
    far = fig.axes[0].texts[3]
    assert far.xyann == (3, 0)


def test_reward_curves_end_labels_are_stacked_where_the_layout_puts_the_ends():
    """The labels were stacked by where the curves ended before the layout, which then shrank the axes (under a
    three-line note): on the demo's Figure 5 two labels 7 pt apart before it printed over each other after it.
    These are that figure's rewards and note."""
    raw = [[0.2727, 0.5917, -0.0889, 0.3327], [0.2727, 0.5956, -0.1593, 0.3120], [0.2727, 0.5414, -0.0669, 0.3640]]
    curves = [{"label": f"run {i}", "steps": np.arange(1, 5), "reward": np.array(r), "pair": f"(13{i}0.00, 29.00)"}
              for i, r in enumerate(raw)]
    note = ("scale=demo; demo weights (trained on the embedded set); stage-2 reward: clap; codec and reward (clap): "
            "demo weights (trained on the embedded set); text: demo weights (the demo CLAP's RoBERTa at its seeded "
            "random init: untrained text states)")
    fig = reward_curves.plot(curves, smooth=0.9, note=note)
    fig.canvas.draw()
    boxes = sorted((t.get_window_extent() for t in fig.axes[0].texts), key=lambda b: b.y0)
    assert all((hi.y0 - lo.y1) * 72 / fig.dpi >= 1 for lo, hi in zip(boxes, boxes[1:]))


def test_continuous_recon_command_on_the_demo_codec(tmp_path):
    """The probe behind the README's continuous-token reconstruction line: PCA of the demo codec's latent
    against its RVQ, one row per candidate, labelled with the weights; bad sizes are refused by key."""
    out = tmp_path / "recon"
    written = probe_main("continuous_recon", continuous_recon.ContinuousReconConfig, continuous_recon.run,
                         ["dims=4,1024", "train_per_class=1", f"out={out}"])
    rows = pd.read_csv(written[0]).set_index("name")
    assert rows.index.tolist() == ["latent-1024", "RVQ-12", "PCA-4", "PCA-1024"]
    assert set(rows["weights"]) == {"demo weights (trained on the embedded set)"} and set(rows["n_test"]) == {15}
    assert rows.loc["PCA-1024", "latent_fvu"] < 1e-4 < rows.loc["PCA-4", "latent_fvu"]
    assert rows.loc["PCA-1024", "snr_db"] > rows.loc["PCA-4", "snr_db"]
    # against the input audio on rvq_depth's scale: the lossless fit decodes as the latent itself does
    assert rows.loc["PCA-1024", "mel_l1_input"] == pytest.approx(rows.loc["latent-1024", "mel_l1_input"], abs=1e-3)
    assert (out / "config.json").is_file()
    for bad in ("dims=0", "dims=2048"):
        with pytest.raises(ConfigError, match="dims="):
            probe_main("continuous_recon", continuous_recon.ContinuousReconConfig, continuous_recon.run, [bad])
