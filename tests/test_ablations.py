"""Ablation grids: expansion and cell sharing, tables, errors, and real runs of demo cells through
the local executor and through a real single-node SLURM (preempted and resumed mid-training)."""
import json
import logging
import math
import os
import time
from pathlib import Path

import pytest
import submitit

from ablations import pipeline
from ablations.grid import grid_names, load_grid
from ablations.plan import cells_of, parse, pick_rows, stage1_dir
from ablations.run import main
from ablations.scales import resolve
from ablations.tables import Outcome, build_frame, to_latex, to_markdown
from siren.checkpoint import load_latest
from siren.config import ConfigError
from tests.helpers import overridden, startup_env
from tests.slurm_cluster import preempt, slurm_cluster  # noqa: F401

PAPER_GRIDS = ["table3", "table4", "table5", "table6", "table7"]


def _cells(grid: str, scale: str, *extra: str):
    return cells_of(load_grid(grid), parse([f"grid={grid}", f"scale={scale}", *extra]))


def test_every_paper_table_and_figure_has_a_grid():
    assert set(grid_names()) == {*PAPER_GRIDS, "figure5", "continuous"}
    for name in grid_names():
        grid = load_grid(name)
        for row in grid.rows:  # a row either runs or says plainly why it cannot
            assert row.cell is not None or row.needs


@pytest.mark.parametrize("name", PAPER_GRIDS + ["figure5"])
def test_status_lists_every_cell_without_submitting(name, tmp_path, capsys):
    assert main([f"grid={name}", f"out={tmp_path}", "action=status"]) == 0
    out = capsys.readouterr().out
    for cell in _cells(name, "demo"):
        assert cell.id in out
    n_jobs = len(out.splitlines()) - 4  # the plan line, the header, the count line, what MISSING means
    assert out.splitlines()[-2:] == [f"{n_jobs} job(s): {n_jobs} MISSING",
                                     "MISSING: not submitted yet (the same command without action= runs them)"]
    assert not (tmp_path / "demo" / "jobs").exists()


@pytest.mark.parametrize("scale", ["demo", "paper"])
def test_a_cell_shared_by_several_tables_runs_once(scale):
    tables = {}
    for name in PAPER_GRIDS:
        for cell in _cells(name, scale):
            tables.setdefault(cell.id, set()).update(f"{name}:{r.label}" for r in cell.rows)
    shared = [v for v in tables.values() if len(v) > 1]
    # the paper's own cross-references: the 1.6B single model, Siren without RL, AudioGen, Siren with RL
    assert {"table3:Base Single", "table5:Accumu. AR", "table6:1-12"} in shared
    assert {"table3:Isolated-Small", "table4:+ Accumulated Cond.", "table5:Collaborative (ours)",
            "table6:6-2"} in shared
    assert {"table4:Baseline (AudioGen-style parallel heads)", "table5:Indpdt."} in shared
    assert {"table4:+ RL Align", "table7:Anti-Causal, 1 model"} in shared
    assert len(shared) == 4


@pytest.mark.parametrize("scale", ["demo", "paper"])
def test_continuous_grid_shares_the_baselines_and_sizes_its_presets(scale):
    """grid=continuous: the AudioGen-style and Siren 6-2 rows are Tables 4/5's cells (same hash); its continuous
    cells train family=continuous (MNTP where the row says) and, at paper scale, count within 1% of 193M / 462M."""
    from ablations.outcomes import _params
    from ablations.steps import continuous_config, stage1_args
    from siren.train import parse as stage1_parse

    ids = {c.id for c in _cells("table4", scale)} & {c.id for c in _cells("table5", scale)}
    cells = _cells("continuous", scale)
    labels = {r.label: c for c in cells for r in c.rows}
    assert {labels["AudioGen-style (discrete 1-12, parallel heads)"].id, labels["Siren 6-2 (reference)"].id} <= ids
    for size, n in (("Base", 193e6), ("Large", 462e6)):
        plain, mntp = labels[f"Continuous LM, {size}"], labels[f"Continuous LM + MNTP, {size}"]
        assert plain.id != mntp.id
        for cell, want in ((plain, False), (mntp, True)):
            cfg = stage1_parse(stage1_args(cell.cfg))
            assert cfg.family == "continuous" and cfg.continuous.mntp is want and cell.n_experts == 1
        if scale == "paper":
            assert abs(float(_params(plain, "#Parameter")[:-1]) * 1e6 - n) / n < 0.01
    assert len(cells) == (4 if scale == "demo" else 6)  # demo: Base and Large share the tiny preset
    assert continuous_config(labels["Continuous LM, Base"].cfg).token_dim == (8 if scale == "demo" else 64)


@pytest.mark.parametrize("scale,dropout", [("demo", 0.0), ("paper", 0.1)])
def test_experts_train_with_their_sizes_dropout(scale, dropout):
    """The authors' tiny.json has dropout 0.0, their 1.6B/3.1B configs 0.1. The grids pass `scale=tiny arch=official`:
    the architecture must not override the size's dropout (it did, until 2026-12-02)."""
    from ablations.steps import stage1_args
    from siren.train import parse as stage1_parse

    for name in PAPER_GRIDS:
        for cell in _cells(name, scale):
            if cell.cfg.get("model.family", "discrete") == "discrete":
                assert stage1_parse(stage1_args(cell.cfg)).model.dropout == dropout, (name, cell.id)


def test_overrides_change_identity_and_rows_select():
    base = {c.id for c in _cells("table6", "demo")}
    assert len(base) == 5 and len({c.id for c in _cells("table6", "paper")} & base) == 0
    assert {c.id for c in _cells("table6", "demo", "set.train.steps=7")}.isdisjoint(base)
    assert [c.rows[0].label for c in _cells("table6", "demo", "rows=6-2,1-12")] == ["1-12", "6-2"]
    # a label may hold a comma: the longest run of parts that is a label is taken
    picked = _cells("table7", "demo", "rows=Causal, 1 model,Anti-Causal, 1 model")
    assert sorted(r.label for c in picked for r in c.rows) == ["Anti-Causal, 1 model", "Causal, 1 model"]
    assert pick_rows("1-12,,7-1", ["1-12", "6-2"]) == ({"1-12"}, ["7-1"])



def test_stage2_overrides_reach_only_the_rows_that_align(caplog):
    """`set.rl.steps=100` re-runs a grid's aligned rows and reuses the cells of its unaligned rows (their
    identity changed with every rl.* key until 2026-12-04, so each was evaluated again); a stage-2 key is
    still checked where no row aligns, and said to change nothing."""
    def ids(grid, *extra):
        return {c.rows[0].label: c.id for c in _cells(grid, "demo", *extra)}

    base, longer = ids("table4"), ids("table4", "set.rl.steps=100")
    aligned = [c.rows[0].label for c in _cells("table4", "demo") if "rl.method" in c.cfg]
    assert aligned and len(aligned) < len(base)
    assert {r for r in base if base[r] != longer[r]} == set(aligned)

    # without stage-2 overrides a cell is its full resolved config, as before: cells already made keep their ids
    assert all(c.cfg == resolve(c.rows[0].cell, "demo") for c in _cells("table4", "demo"))
    with caplog.at_level(logging.WARNING, logger="ablations.plan"):
        assert ids("table6", "set.rl.steps=100") == ids("table6")
    assert "set.rl.steps" in caplog.text and "table6" in caplog.text
    with pytest.raises(ConfigError, match="steps"):
        _cells("table6", "demo", "set.rl.steps=-3")
    # rl.n=2 suits the 6-2 row that aligns; the 1-12 baseline beside it (one expert) does not read it
    two = ids("table4", "set.rl.n=2")
    assert {r for r in base if base[r] != two[r]} == set(aligned)
    # set.rl.method switches the aligned rows' method; it gave every unaligned row a stage 2 under its label
    dpo = _cells("table4", "demo", "set.rl.method=dpo")
    assert {c.rows[0].label for c in dpo if "rl.method" in c.cfg} == set(aligned)
    assert all(c.cfg["rl.method"] == "dpo" for c in dpo if "rl.method" in c.cfg)

def test_the_weight_decay_default_moved_no_demo_id_and_every_paper_id():
    """train.weight_decay's default went from 0.1 to the authors' 0.05 (2026-12-07). The demo keeps 0.1 and its cells
    their ids (their runs and evaluations are reused: the same training); paper cells, now 0.05, get new ones (a cell
    trained under 0.1 is not reused), and set.train.weight_decay=0.1 finds those again."""
    from ablations.grid import cell_id

    demo = _cells("table6", "demo")
    assert all(c.cfg["train.weight_decay"] == 0.1 for c in demo)
    before = {k: v for k, v in demo[0].cfg.items() if k != "train.weight_decay"}  # the resolved cell until then
    assert demo[0].id == cell_id(before)
    paper, former = _cells("table6", "paper"), _cells("table6", "paper", "set.train.weight_decay=0.1")
    for now, then in zip(paper, former):
        assert now.cfg["train.weight_decay"] == 0.05 and then.cfg["train.weight_decay"] == 0.1
        assert now.id != then.id == cell_id({k: v for k, v in now.cfg.items() if k != "train.weight_decay"})


def test_demo_identity_follows_the_demo_weight_files(tmp_path, monkeypatch):
    """Outputs made with older demo weights (an earlier checkout) are not reused: every id changes."""
    import shutil

    from siren import demo_weights

    base = {c.id for c in _cells("table6", "demo")}
    copy = tmp_path / "files"
    shutil.copytree(demo_weights.FILES, copy)
    monkeypatch.setattr(demo_weights, "FILES", copy)
    demo_weights.files_id.cache_clear()
    try:
        assert {c.id for c in _cells("table6", "demo")} == base  # same contents, same ids
        with open(copy / "vggish.demo.safetensors", "ab") as f:
            f.write(b"\0")
        demo_weights.files_id.cache_clear()
        assert {c.id for c in _cells("table6", "demo")}.isdisjoint(base)
        assert {c.id for c in _cells("table6", "paper")}.isdisjoint(base)
    finally:
        demo_weights.files_id.cache_clear()


def test_pretrained_identity_follows_the_pretrained_files(tmp_path, monkeypatch, caplog):
    """A pretrained file replaced by hand in the assets cache (another checkpoint under the published name): the
    cells made with the former file were reused (the ids named the weights mode, not the files); now they run
    again. A file touched but not changed keeps them; ImageBind's file moves only the rows that align with it."""
    from siren import assets

    monkeypatch.setenv("SIREN_CACHE", str(tmp_path))
    for a in assets.ASSETS.values():
        assets.path(a.name).parent.mkdir(parents=True, exist_ok=True)
        assets.path(a.name).write_bytes(a.name.encode())

    def ids():
        return {c.rows[0].label: c.id for c in _cells("table4", "paper")}

    base = ids()
    caplog.clear()  # the first hashes (logged where an earlier CLI run in this process set siren's level to INFO)
    os.chmod(assets.path("clap"), 0o600)  # a new ctime, the same bytes: hashed again, the same identity
    with caplog.at_level(logging.INFO, logger="siren.assets"):
        assert ids() == base
    assert caplog.text.count("hashing") == 1 and "630k-audioset-best.pt" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="siren.assets"):
        ids()
    assert "hashing" not in caplog.text  # each file's version unchanged: stat only
    assets.path("clap").write_bytes(b"another checkpoint")
    replaced = ids()
    assert all(replaced[r] != base[r] for r in base)
    assets.path("imagebind").write_bytes(b"another ImageBind")
    aligned = {c.rows[0].label for c in _cells("table4", "paper") if "rl.method" in c.cfg}
    assert aligned and {r for r, i in ids().items() if i != replaced[r]} == aligned
    # a metric network's file moves the evaluations, not the prepared data (made by the codec and CLAP alone)
    from ablations.plan import data_dir

    cell, before = _cells("table4", "paper")[0], ids()
    data = data_dir(cell.cfg, tmp_path / "grid")
    assets.path("vggish").write_bytes(b"another VGGish")
    assert data_dir(cell.cfg, tmp_path / "grid") == data and all(i != before[r] for r, i in ids().items())
    # data prepared before the ids held the files' hashes is found under the id it had
    from ablations.grid import cell_id
    from ablations.plan import _data_keys

    legacy = tmp_path / "grid" / "data" / cell_id(_data_keys(cell.cfg), pretrained_files=False)
    legacy.mkdir(parents=True)
    assert legacy != data and data_dir(cell.cfg, tmp_path / "grid") == legacy


@pytest.mark.parametrize("args, words", [
    (["grid=table9"], ["table9", "table6", "figure5"]),
    (["grid=table6", "executr=slurm"], ["executr", "executor"]),
    (["grid=table6", "executor=slurm", "profile=nope"], ["nope", "local", "example_gpu"]),
    (["grid=table6", "executor=cloud"], ["cloud", "slurm", "local", "debug"]),
    (["grid=table6", "rows=7-1"], ["7-1", "6-2"]),
    (["grid=table6", "scale=huge"], ["huge", "demo", "paper"]),
    # a grid job is one process: 8 GPUs were reserved and 7 sat idle
    (["grid=table6", "gpus=8"], ["gpus=8", "one process on one GPU", "torchrun"]),
])
def test_bad_grid_key_profile_name_the_valid_ones(args, words):
    with pytest.raises((ConfigError, ValueError, FileNotFoundError)) as e:
        cfg = parse(args)
        cells_of(load_grid(cfg.grid), cfg)
    for w in words:
        assert w in str(e.value)


def test_every_job_of_a_plan_is_requeued_on_a_time_limit(tmp_path):
    # only training and stage 2 were submitted as Checkpointable: an evaluation (12 h asked) capped by a profile's
    # timeout_min failed with "timed-out and not checkpointable", though its clips and embeddings are kept
    from ablations.plan import plan

    run_cfg = parse(["grid=table7", "scale=demo", f"out={tmp_path}"])
    jobs = plan(cells_of(load_grid("table7"), run_cfg), run_cfg)
    kinds = {j.fn.__name__ for j in jobs}
    assert {"prepare_step", "train_step", "align_step", "eval_step", "calibration_step"} <= kinds
    assert all(isinstance(pipeline._callable(j), submitit.helpers.Checkpointable) for j in jobs)


@pytest.mark.parametrize("gpus", [0, 1])
def test_the_codec_passes_over_the_training_set_get_the_grids_gpus(tmp_path, gpus):
    """prepare (and the continuous family's latents) ran the codec over the whole training set on 2 CPU cores:
    ~70 h for 100k clips at scale=paper, over the requeues' ceiling; they take the GPU the other jobs get (the plan is
    the same at either scale)."""
    from ablations.plan import plan

    run_cfg = parse(["grid=continuous", f"out={tmp_path}", f"gpus={gpus}"])
    jobs = {j.fn.__name__: j for j in plan(cells_of(load_grid("continuous"), run_cfg), run_cfg)}
    assert jobs["prepare_step"].gpus == jobs["latents_step"].gpus == jobs["train_step"].gpus == gpus
    # the two a retry runs again when a job reading their files failed (ledger.reopen_for_retry)
    assert [n for n, j in sorted(jobs.items()) if j.recheck] == ["latents_step", "prepare_step"]


def test_tables_mark_equal_values_alike_and_the_next_one_second():
    # two rows of one cell (Base and Large at scale=demo) print the same numbers: one was bold and the other
    # underlined, and the real second value went unmarked
    grid = load_grid("table6")
    outcomes = {"1-12": Outcome({"FD": 3.0, "CLAP": 5.0}), "2-6": Outcome({"FD": 1.0, "CLAP": 9.0}),
                "4-3": Outcome({"FD": 1.0, "CLAP": 9.001}), "6-2": Outcome({"FD": 2.0, "CLAP": 7.0})}
    md = to_markdown(build_frame(grid, outcomes, "ours"), grid, "scale=demo")
    lines = {l.split("|")[1].strip(): l for l in md.splitlines() if l.startswith("| ") and "| ours |" in l}
    assert "**1.00**" in lines["2-6"] and "**1.00**" in lines["4-3"] and "<u>2.00</u>" in lines["6-2"]
    assert "**9.00**" in lines["2-6"] and "**9.00**" in lines["4-3"] and "<u>7.00</u>" in lines["6-2"]
    assert "<u>" not in lines["1-12"] and "**" not in lines["1-12"]


def test_the_caption_says_overrides_and_evaluations_labelled_otherwise(tmp_path):
    """The caption came from the grid's `weights` key alone: a pretrained file replaced by one given by path (its
    cards say "file ...") printed as "pretrained weights", and `set.train.seed=1` overwrote the table with nothing
    saying seed 1."""
    from ablations.outcomes import caption

    run = parse(["grid=table6", f"out={tmp_path}"])
    cells = cells_of(load_grid("table6"), run)
    same = {"1-12": Outcome({"FD": 1.0}, weights="demo")}
    assert caption(run, cells, same) == "scale=demo; demo weights (trained on the embedded set)"
    seeded = parse(["grid=table6", f"out={tmp_path}", "set.train.seed=1"])
    other = {**same, "2-6": Outcome({"FD": 1.0}, weights="mixed: fd_kl_is=demo, generation codec=random")}
    assert caption(seeded, cells_of(load_grid("table6"), seeded), other) == (
        "scale=demo; demo weights (trained on the embedded set); evaluated with: mixed: fd_kl_is=demo, generation "
        "codec=random; set: train.seed=1")
    # Figure 5's title is the paper's ("Rewards (ImageBind Cosine) ..."): a table of stage-2 rows says its reward
    for scale, reward in (("demo", "clap"), ("paper", "imagebind")):
        run = parse(["grid=figure5", f"out={tmp_path}", f"scale={scale}"])
        assert caption(run, cells_of(load_grid("figure5"), run), {}).endswith(f"; stage-2 reward: {reward}")


def test_tables_rank_within_each_source_and_say_itg_and_weights():
    grid = load_grid("table6")
    outcomes = {"1-12": Outcome({"FD": 3.0, "ISC": 2.0, "CLAP": 5.0, "Loss Ratio": 1.2}),
                "2-6": Outcome({"FD": 1.0, "ISC": 4.0, "CLAP": 9.0, "Loss Ratio": 1.1}),
                "4-3": Outcome({"FD": 2.0, "ISC": 3.0, "CLAP": 1.0, "Loss Ratio": 1.3}),
                "12-1": Outcome({}, "itg", "non-finite logits at step 3")}
    df = build_frame(grid, outcomes, "ours (demo, RANDOM weights)")
    md = to_markdown(df, grid, "scale=demo; RANDOM weights")
    lines = {(l.split("|")[1].strip(), l.split("|")[2].strip()): l for l in md.splitlines() if l.startswith("| ")}
    ours = lambda label: lines[(label, "ours (demo, RANDOM weights)")]
    assert "**1.00**" in ours("2-6") and "<u>2.00</u>" in ours("4-3")  # FD: lower is better
    assert "**9.00**" in ours("2-6") and "<u>5.00</u>" in ours("1-12")  # CLAP: higher is better
    assert "**12.09**" in lines[("6-2", "paper")]  # the paper's block is ranked on its own
    assert "itg (non-finite logits at step 3)" in ours("12-1") and "pending" in ours("6-2")
    assert "RANDOM weights" in md
    tex = to_latex(df, grid, "scale=demo")
    assert r"\toprule" in tex and r"\textbf{1.00}" in tex and r"\underline{2.00}" in tex
    assert r"- & \multicolumn{4}{c}{itg (non-finite logits at step 3)}" in tex  # the size column stays its own
    # the paper's 12-1 row: its 140M beside itg, as printed
    assert lines[("12-1", "paper")].split("|")[3:5] == [" 140M ", " itg "]
    assert r"12-1 & paper & 140M & \multicolumn{4}{c}{itg}" in tex
    # what itg means is said beside the table (it was in the README only); not under a table without one
    assert md.count("- itg: inability to generate") == 1 and "itg: inability to generate" in tex
    plain = load_grid("table5")
    assert "inability to generate" not in to_markdown(build_frame(plain, {}, "ours"), plain, "scale=demo")


def test_job_waves_follow_dependencies():
    jobs = [pipeline.Job(k, print, {}, Path("/nonexistent") / k, deps=d)
            for k, d in [("eval", ["a", "b"]), ("a", ["prep"]), ("prep", []), ("b", ["prep"])]]
    assert [[j.key for j in w] for w in pipeline._levels(jobs)] == [["prep"], ["a", "b"], ["eval"]]
    with pytest.raises(ValueError, match="cycle"):
        pipeline._levels([pipeline.Job("x", print, {}, Path("/x"), deps=["y"]),
                          pipeline.Job("y", print, {}, Path("/y"), deps=["x"])])


def _record_start(log: str, name: str) -> None:
    with open(log, "a") as f:
        f.write(name + "\n")


@pytest.mark.parametrize("scale", ["demo", "paper"])
def test_calibration_rows_wait_for_what_they_read_not_for_prepare(scale):
    """They read the test clips and the codec: at demo scale they wait for a job writing the demo set (prepare
    writes it too, and waits for nothing), with a user's manifests for nothing; the second row waits for the
    first (cached references)."""
    from ablations.plan import plan

    paper = ["set.data.train=t.csv", "set.data.test=a.csv", "set.data.prompts=p.csv"] if scale == "paper" else []
    run = parse(["grid=table6", f"scale={scale}", "calibration=true", "rows=1-12", *paper])
    deps = {j.key: j.deps for j in plan(cells_of(load_grid("table6"), run), run)}
    did = next(k for k in deps if k.startswith("data-"))[len("data-"):]
    source = [f"source-{did}"] if scale == "demo" else []
    assert deps[f"data-{did}"] == [] and deps.get(f"source-{did}", []) == []
    cid = next(k for k in deps if k.startswith("calib-")).split("/")[0]
    assert deps[f"{cid}/oracle"] == source and deps[f"{cid}/chance"] == [*source, f"{cid}/oracle"]
    assert len(deps) == 5 + len(source)  # prepare, the 1-12 expert, its eval, two calibration rows


def test_a_row_names_its_failed_data_job_and_a_bad_training_log(tmp_path):
    """A failed prepare left every row's own jobs BLOCKED, and the table said "pending"; a training log
    without a layer's CE (Loss Ratio) raised out of the table builder, losing every row. Both are now the
    row's own "failed" with the reason."""
    from ablations.ledger import JobState
    from ablations.outcomes import outcome
    from ablations.plan import data_dir, stage1_dir

    run = parse(["grid=table6", "rows=1-12", f"out={tmp_path}"])
    grid, cell = load_grid("table6"), cells_of(load_grid("table6"), run)[0]
    did = data_dir(cell.cfg, run.root).name
    states = {f"data-{did}": JobState(f"data-{did}", "FAILED", log="prepare.log"),
              f"{cell.id}/eval": JobState(f"{cell.id}/eval", "BLOCKED")}
    got = outcome(cell, grid, run, states)
    assert got.status == "failed" and "prepare.log" in got.reason
    (cell.dir / "eval").mkdir(parents=True)
    (cell.dir / "eval" / "results.json").write_text(json.dumps({"metrics": {"fd": 1.0, "isc": 1.0, "clap": 1.0}}))
    (cell.dir / "eval.done").touch()
    (stage1_dir(cell, run) / "expert_0").mkdir(parents=True)
    (stage1_dir(cell, run) / "expert_0" / "log.jsonl").write_text(json.dumps({"step": 1, "ce/L1": 1.0}) + "\n")
    got = outcome(cell, grid, run, {})
    assert got.status == "failed" and "layers" in got.reason, got


def test_a_results_json_without_its_done_marker_is_not_the_rows_result(tmp_path):
    # an evaluation run again (its eval.done deleted, as the fix messages say) that fails or is still running left
    # the former results.json, and the table printed and ranked those numbers as the row's result
    from ablations.ledger import JobState
    from ablations.outcomes import outcome

    run = parse(["grid=table6", "rows=12-1", f"out={tmp_path}"])
    grid, cell = load_grid("table6"), cells_of(load_grid("table6"), run)[0]
    (cell.dir / "eval").mkdir(parents=True)
    (cell.dir / "eval" / "results.json").write_text(json.dumps({"metrics": {"fd": 1.0, "isc": 1.0, "clap": 1.0}}))
    failed = {f"{cell.id}/eval": JobState(f"{cell.id}/eval", "FAILED", log="eval.log")}
    assert outcome(cell, grid, run, failed).status == "failed"
    assert outcome(cell, grid, run, {f"{cell.id}/eval": JobState(f"{cell.id}/eval", "RUNNING")}).status == "pending"
    # no sacct row (yet, or slurmdbd down): the launcher takes it as possibly running; the table said "failed"
    assert outcome(cell, grid, run, {f"{cell.id}/eval": JobState(f"{cell.id}/eval", "UNKNOWN")}).status == "pending"
    # an itg row keeps its size beside the status, as the paper prints 12-1's 140M
    (cell.dir / "eval" / "results.json").write_text(json.dumps({"status": "itg", "reason": "non-finite logits"}))
    (cell.dir / "eval.done").touch()
    got = outcome(cell, grid, run, {})
    size = got.values[grid.columns[0]]  # "#Single Para."
    assert got.status == "itg" and size.endswith("M")
    line = next(l for l in to_markdown(build_frame(grid, {"12-1": got}, "ours"), grid, "c").splitlines()
                if l.startswith("| 12-1 | ours"))
    assert line.split("|")[3].strip() == size and "itg (non-finite logits)" in line


def test_tables_escape_notes_and_rank_on_the_printed_digits():
    # a failure note with '|' or a line break broke its Markdown row, and '$', '{', '^' its LaTeX; pandas' round()
    # ranks 2.675 above 2.67 though both print 2.67 (f"{2.675:.2f}" is "2.67")
    grid = load_grid("table6")
    outcomes = {"1-12": Outcome({"FD": 2.675}), "2-6": Outcome({"FD": 2.67}), "4-3": Outcome({"FD": 3.0}),
                "6-2": Outcome({}, "failed", "a | b\nc $x^2$ {d} ~")}
    df = build_frame(grid, outcomes, "ours")
    md = to_markdown(df, grid, "c")
    rows = {l.split("|")[1].strip(): l for l in md.splitlines() if "| ours |" in l}
    assert "**2.67**" in rows["1-12"] and "**2.67**" in rows["2-6"] and "<u>3.00</u>" in rows["4-3"]
    assert r"failed (a \| b c $x^2$ {d} ~)" in rows["6-2"]
    tex = to_latex(df, grid, "c")
    assert r"failed (a | b c \$x\textasciicircum{}2\$ \{d\} \textasciitilde{})" in tex


def _preempted_step():
    from ablations.steps import Preempted

    raise Preempted("training stopped on a signal after checkpointing")


def test_a_job_stopped_after_checkpointing_is_interrupted_not_failed(tmp_path):
    """Outside SLURM a SIGTERM makes training checkpoint and the step raise Preempted; the job then wrote a
    failure marker, so a plain re-run skipped it (FAILED wants retry=true). A second copy of a finished job
    (resubmitted while the first ran) found no done check and ran the work again."""
    from ablations.ledger import failed_marker
    from ablations.pipeline import run_marked
    from ablations.steps import Preempted

    done = tmp_path / "train.done"
    with pytest.raises(Preempted):
        run_marked(_preempted_step, str(done), {}, 1, os.getcwd())
    assert not failed_marker(done).exists() and not done.exists()
    done.write_text("{}")
    assert run_marked(_preempted_step, str(done), {}, 1, os.getcwd()) is None  # done: the step is not run again


def test_a_manifest_edited_in_place_is_other_data(tmp_path):
    """Cells were identified by the manifests' paths: after an edit of train.csv a re-run found prepare's and
    every cell's done markers and reused the old data's results. The manifests' contents are in the ids now."""
    from ablations.plan import data_dir

    for name in ("train", "test", "prompts"):
        (tmp_path / f"{name}.csv").write_text("id,audio,caption\na,a.wav,a dog barks\n")
    sets = [f"set.data.{n}={tmp_path / n}.csv" for n in ("train", "test", "prompts")]

    def ids():
        cell = cells_of(load_grid("table6"), parse(["grid=table6", "scale=paper", "rows=1-12", *sets]))[0]
        return cell.id, data_dir(cell.cfg, tmp_path).name

    before = ids()
    assert ids() == before
    (tmp_path / "train.csv").write_text("id,audio,caption\na,a.wav,rain falls\n")
    after = ids()
    assert after[0] != before[0] and after[1] != before[1]


def test_a_new_test_set_or_subset_reevaluates_without_training_again(tmp_path):
    """data.test / data.subset / data.prompts were in the data and stage-1 ids: evaluating the trained grid on a
    subset prepared and trained every model again (at paper scale, days). Now only the cells' evaluations are new;
    a grid made before keeps its folders (the former ids' folders are used where only they exist)."""
    from ablations.plan import data_dir

    for name in ("train", "test", "prompts", "sub"):
        (tmp_path / f"{name}.csv").write_text("id,audio,caption\na,a.wav,a dog barks\n")
    (tmp_path / "sub.txt").write_text("a\n")

    def where(*extra):
        run = parse(overridden(["grid=table6", "scale=paper", "rows=6-2", f"out={tmp_path / 'o'}",
                                *(f"set.data.{n}={tmp_path / n}.csv" for n in ("train", "test", "prompts"))], extra))
        cell = cells_of(load_grid("table6"), run)[0]
        return cell.id, data_dir(cell.cfg, run.root), stage1_dir(cell, run)

    base = where()
    subset = where(f"set.data.subset={tmp_path / 'sub.txt'}")
    other_test = where(f"set.data.test={tmp_path / 'sub.csv'}")
    assert subset[0] != base[0] and other_test[0] != base[0]  # new evaluations ...
    assert subset[1:] == other_test[1:] == base[1:]  # ... of the same prepared data and trained models
    (tmp_path / "train.csv").write_text("id,audio,caption\na,a.wav,rain falls\n")
    assert where()[1] != base[1] and where()[2] != base[2]
    # a grid prepared and trained before the change: its folders are keyed by every data key, and are used
    from ablations.grid import cell_id

    run = parse(["grid=table6", "scale=paper", "rows=6-2", f"out={tmp_path / 'o'}",
                 *(f"set.data.{n}={tmp_path / n}.csv" for n in ("train", "test", "prompts"))])
    cell = cells_of(load_grid("table6"), run)[0]
    former = cell_id({k: v for k, v in cell.cfg.items() if not k.startswith(("rl.", "eval."))},
                     pretrained_files=False)  # made before the ids held the pretrained files' hashes too
    (run.root / "stage1" / former).mkdir(parents=True)
    assert stage1_dir(cell, run).name == former


def test_calibration_rows_follow_the_evaluation_protocol(tmp_path):
    """They are scored by the cells' eval.* settings: `set.eval.seconds=2` re-ran the model rows but kept
    the old protocol's calibration rows beside them. The model's generation batch is not theirs. And the data
    id covers the crop length prepare scores (a filtered run reused a prepare without those scores)."""
    from ablations.plan import calibration_id, data_dir

    def ids(*sets):
        cell = cells_of(load_grid("table6"), parse(["grid=table6", "rows=1-12", *sets]))[0]
        return data_dir(cell.cfg, tmp_path).name, calibration_id(cell.cfg)

    base = ids()
    assert ids("set.eval.gen_batch_size=8") == base
    # prepare scores crops of train.crop_s when the crop filter is on: then that length is part of the data
    filtered = ids("set.train.crop_min_clap=0.2", "set.train.crop_s=0.5")
    assert filtered[0] != base[0] and filtered[0] != ids("set.train.crop_min_clap=0.2", "set.train.crop_s=0.6")[0]
    assert ids("set.train.crop_s=0.5")[0] == base[0]  # without the filter prepare does not read it
    assert ids("set.eval.seconds=2")[0] == base[0] and ids("set.eval.seconds=2")[1] != base[1]


def test_local_runs_jobs_others_wait_on_before_leaves(tmp_path, caplog):
    """Two cells (train -> eval) after a prepare step, one slot: both trainings run before either eval,
    then the evals in plan order; a dependency is never started before it is done. A line as each job ends."""
    log = str(tmp_path / "order.txt")
    graph = [("prep", []), ("a/train", ["prep"]), ("a/eval", ["a/train"]), ("b/train", ["prep"]),
             ("b/eval", ["b/train"])]
    jobs = [pipeline.Job(k, _record_start, {"log": log, "name": k}, tmp_path / f"{k.replace('/', '_')}.done", deps=d)
            for k, d in graph]
    with caplog.at_level(logging.INFO, logger="ablations.pipeline"):
        states = pipeline.run_local(jobs, tmp_path, "debug", retry=False, max_parallel=1)
    assert {s.state for s in states.values()} == {"DONE"}
    assert Path(log).read_text().split() == ["prep", "a/train", "b/train", "a/eval", "b/eval"]
    ends = [m.split(" done in ")[0] for m in caplog.messages if " done in " in m]
    assert ends == ["[1/5] prep", "[2/5] a/train", "[3/5] b/train", "[4/5] a/eval", "[5/5] b/eval"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ablations.pipeline"):  # all done: nothing to run, no lines
        pipeline.run_local(jobs, tmp_path, "debug", retry=False, max_parallel=1)
    assert not caplog.messages


def _make_file(path: str) -> None:  # a prepare: remakes its file only when it is not whole
    if not Path(path).exists() or Path(path).read_text() != "whole":
        Path(path).write_text("whole")


def _read_file(path: str) -> None:
    if Path(path).read_text() != "whole":
        from siren.errors import DataError

        raise DataError(f"{path}: a damaged prepared file; run prepare again")


def test_a_retry_runs_a_done_prepare_again_when_a_job_reading_its_files_failed(tmp_path, capsys):
    """A prepared file damaged after prepare: every training failed on it, and retry=true submitted them again
    while prepare's done marker kept it done; only deleting that marker by hand (said nowhere) repaired it."""
    from ablations import ledger

    data = str(tmp_path / "codes")
    jobs = [pipeline.Job("data-x", _make_file, {"path": data}, tmp_path / "prepared.done", recheck=True),
            pipeline.Job("train", _read_file, {"path": data}, tmp_path / "train.done", deps=["data-x"])]
    assert {s.state for s in pipeline.run_local(jobs, tmp_path, "debug", retry=False, max_parallel=1).values()} \
        == {"DONE"}
    Path(data).write_text("dam")
    (tmp_path / "train.done").unlink()
    assert pipeline.run_local(jobs, tmp_path, "debug", retry=False, max_parallel=1)["train"].state == "FAILED"
    (tmp_path / "train.done.failed").write_text(json.dumps({"error": "TIMEOUT"}))  # not its data: not reopened
    assert ledger.reopen_for_retry(jobs, tmp_path) == []
    (tmp_path / "train.done.failed").write_text(json.dumps({"error": "DataError: a damaged prepared file"}))
    assert ledger.reopen_for_retry(jobs, tmp_path) == ["data-x"]
    states = pipeline.run_local(jobs, tmp_path, "debug", retry=True, max_parallel=1)
    assert {s.state for s in states.values()} == {"DONE"} and Path(data).read_text() == "whole"
    assert ledger.reopen_for_retry(jobs, tmp_path) == []  # nothing failed: nothing runs again


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
@pytest.mark.parametrize("own", [None, "65536"])
def test_local_jobs_get_the_job_settings_and_the_launcher_keeps_its_own(tmp_path, monkeypatch, own):
    """A real local job (a process of its own) starts with the malloc, OpenMP and tqdm settings; a value the user
    set wins; the launcher's environment is as it was afterwards."""
    if own is None:
        monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    else:
        monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", own)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    seen = tmp_path / "env.json"
    job = pipeline.Job("env", startup_env, {"path": str(seen)}, tmp_path / "env.done")
    states = pipeline.run_local([job], tmp_path, "local", retry=False, max_parallel=1, warm=False)
    assert states["env"].state == "DONE"
    assert json.loads(seen.read_text()) == {"MALLOC_MMAP_THRESHOLD_": own or str(32 << 20),
                                            "MALLOC_TRIM_THRESHOLD_": str(1 << 30), "OMP_WAIT_POLICY": "PASSIVE",
                                            "TQDM_MININTERVAL": "30"}
    assert pipeline.os.environ.get("MALLOC_MMAP_THRESHOLD_") == own
    assert "OMP_WAIT_POLICY" not in pipeline.os.environ
    assert "MALLOC_TRIM_THRESHOLD_" not in pipeline.os.environ


def test_a_killed_local_job_is_failed_though_an_earlier_job_of_its_pid_left_a_result(tmp_path):
    """Local job ids are PIDs, and submitit reads a killed job's result from <pid>_0_result.pkl: one an earlier job
    of the same PID left in the shared logs folder made the killed job DONE, and the jobs after it started."""
    import pickle

    (tmp_path / "logs").mkdir()
    planted = range(os.getpid() + 1, os.getpid() + 3000)  # the PIDs handed out next
    for pid in planted:
        (tmp_path / "logs" / f"{pid}_0_result.pkl").write_bytes(pickle.dumps(("success", None)))
    job = pipeline.Job("victim", os.abort, {}, tmp_path / "victim.done")  # dies without a result, as when OOM-killed
    states = pipeline.run_local([job], tmp_path, "local", retry=False, max_parallel=1, warm=False)
    assert states["victim"].state == "FAILED" and not job.done.exists()
    if int(states["victim"].job_id) not in planted:  # the PIDs wrapped: no earlier result lay under the job's id
        pytest.skip(f"the job got PID {states['victim'].job_id}, outside the {len(planted)} planted after ours")


@pytest.fixture(scope="module")
def grid_out(tmp_path_factory):
    """One results folder for the runs below, so the demo set is prepared once."""
    return tmp_path_factory.mktemp("grid")


def _table_row(out: Path, grid: str, label: str) -> str:
    md = (out / "demo" / "tables" / f"{grid}.md").read_text()
    return next(l for l in md.splitlines() if l.startswith(f"| {label} | ours"))


@pytest.mark.parametrize("gpus", [0, 1])
def test_local_jobs_start_cold_where_cuda_is_visible(tmp_path, monkeypatch, caplog, gpus):
    """A job forked from the warm server cannot use CUDA (the server's preload initialised it: every job
    that moved a network to the GPU failed so on an H200), so where torch sees a CUDA device the launcher
    starts no server; jobs that ask for no GPU get a hint that they run on the CPU. CI has no GPU: the probe
    answers yes here, the launcher and the job are real."""
    from ablations import warm

    monkeypatch.setattr(warm, "cuda_visible", lambda: True)
    jobs = [pipeline.Job(f"env{i}", startup_env, {"path": str(tmp_path / f"env{i}.json")}, tmp_path / f"env{i}.done",
                         gpus=gpus) for i in range(2)]
    with caplog.at_level("INFO"):
        states = pipeline.run_local(jobs, tmp_path, "local", retry=False, max_parallel=2)
    assert all(states[f"env{i}"].state == "DONE" and (tmp_path / f"env{i}.json").is_file() for i in range(2))
    assert not (tmp_path / "logs" / "warm.log").exists()
    assert "warm starts off: a CUDA device is visible" in caplog.text
    assert ("the jobs ask for none: they run on the CPU; gpus=1" in caplog.text) == (gpus == 0)
    # local GPU jobs all get the first GPU: two at once share it (seen on an H100), and the launcher says so
    assert ("up to 2 GPU jobs at a time share the same first GPU(s) (max_parallel=2)" in caplog.text) == (gpus == 1)


# A small demo set (2 + 1 clips per class) keeps the end-to-end runs below in CI's budget.
SMALL = ["set.data.demo_train=2", "set.data.demo_test=1", "set.train.steps=6", "set.eval.is_splits=7"]  # 15 clips


@pytest.mark.slow  # six demo jobs, three of them evaluations: ~1.5 min on 2 busy cores
def test_demo_table_runs_end_to_end_with_calibration_rows_then_submits_nothing(grid_out, capsys):
    """A demo Table 6 row and the table's two calibration rows (oracle: the references through the codec;
    chance: random codes), evaluated by the same protocol as the model row; a second run submits nothing."""
    args = ["grid=table6", "rows=1-12", f"out={grid_out}", "executor=local", *SMALL]
    assert main(args) == 0
    # the demo set, prepare, 1 expert, its eval, the two calibration rows
    printed = capsys.readouterr().out
    assert "submitted 6 job(s)" in printed
    row = _table_row(grid_out, "table6", "1-12")
    assert (grid_out / "demo" / "tables" / "table6.md").read_text() in printed  # the table, printed whole
    assert "pending" not in row and "failed" not in row and row.count("|") == 8
    assert "not selected" in _table_row(grid_out, "table6", "6-2")  # left out by rows=, not waiting
    md = (grid_out / "demo" / "tables" / "table6.md").read_text()
    for label in ("oracle (references through the codec)", "chance (random codes)"):
        calib = next(line for line in md.splitlines() if line.startswith(f"| {label} | calibration"))
        assert "pending" not in calib and "failed" not in calib
        assert all(math.isfinite(float(v)) for v in calib.split("|")[4:7])  # FD, ISC, CLAP computed
    assert (grid_out / "demo" / "figures" / "table6.png").stat().st_size > 0
    for kind in ("oracle", "chance"):  # each calibration card says what made its clips
        (res,) = (grid_out / "demo" / "calibration").glob(f"*/{kind}/results.json")
        made = json.loads(res.read_text())["card"]["generated"]
        assert made["made_by"] == f"calibration row {kind}" and made["frontends_weights"] == {"codec": "demo"}
    assert main(args) == 0  # idempotent: everything is done
    assert "submitted 0 job(s)" in capsys.readouterr().out
    md = (grid_out / "demo" / "tables" / "table6.md").read_text()  # as the second run rewrote it
    assert "demo weights (trained on the embedded set)" in md and "RANDOM" not in md and "pretrained" not in md


def _ledger(out: Path, key: str) -> dict:
    return json.loads((out / "demo" / "jobs" / f"{key.replace('/', '__')}.json").read_text())


@pytest.mark.slow  # cold SLURM jobs, a preemption and a requeue: ~1.2 min on 2 busy cores
def test_slurm_grid_preempted_training_resumes_and_finishes(slurm_cluster, grid_out, capsys):  # noqa: F811
    # FAD alone, the one metric of Table 5: the evaluation job, cold on SLURM, then loads no PANNs or CLAP
    small = ["set.data.demo_train=2", "set.data.demo_test=1", "set.train.steps=40", "set.train.ckpt_every=4",
             "set.eval.metrics=fad"]
    args = ["grid=table5", "rows=Indpdt.", f"out={grid_out}", "executor=slurm", f"profile={slurm_cluster.profile}",
            *small]
    cells = _cells("table5", "demo", f"out={grid_out}", "rows=Indpdt.", *small)
    assert main(args) == 0  # submits and returns: the chain advances by afterok dependencies
    assert "submitted" in capsys.readouterr().out
    stage1 = stage1_dir(cells[0], parse([f"out={grid_out}"]))
    key = f"stage1-{stage1.name}/expert_0"
    edir = stage1 / "expert_0"
    deadline = time.time() + 300
    while not list(edir.glob("step_0*[1-9]")) and time.time() < deadline:  # a checkpoint after step 0
        time.sleep(1)
    assert list(edir.glob("step_0*[1-9]")), "training never wrote a checkpoint"
    rec = _ledger(grid_out, key)
    job = submitit.SlurmJob(folder=rec["folder"], job_id=rec["job_id"])
    preempt(job)  # SIGTERM, then SIGUSR2, as SLURM sends them on preemption
    deadline = time.time() + 480
    while time.time() < deadline and not all((c.dir / "eval.done").is_file() for c in cells):
        time.sleep(3)
    assert all((c.dir / "eval.done").is_file() for c in cells), Path(job.paths.stderr).read_text()[-3000:]
    log = Path(job.paths.stderr).read_text()
    assert "resuming from" in log  # the requeued job picked up its checkpoint, not step 0
    resumed_at = int(log.split("resuming from")[1].split("(step ")[1].split(")")[0])
    assert 0 < resumed_at < 40
    assert load_latest(edir).step == 40
    assert main([*args, "action=table"]) == 0
    out = capsys.readouterr().out
    assert "DONE" in out and "table5.md" in out
    row = _table_row(grid_out, "table5", "Indpdt.")
    assert "pending" not in row and "failed" not in row
    assert main(args) == 0 and "submitted 0 job(s)" in capsys.readouterr().out


def test_slurm_cancel_stops_the_queued_grid_and_counts_only_live_jobs(slurm_cluster, tmp_path, capsys):  # noqa: F811
    """action=cancel scancels what may still run; it used to count (and scancel) every recorded job without a done
    marker, so a second cancel, or one after the jobs had failed, reported them all as cancelled again. The states
    come from one sacct call for the whole grid."""
    args = ["grid=table5", "rows=Indpdt.", f"out={tmp_path}", "executor=slurm", f"profile={slurm_cluster.profile}",
            "set.data.demo_train=2", "set.data.demo_test=1", "set.train.steps=4", "set.eval.is_splits=7"]
    assert main(args) == 0
    n = int(capsys.readouterr().out.split("submitted ")[-1].split()[0])
    assert n > 1
    assert main([*args, "action=cancel"]) == 0  # at once: the first job has barely started, the rest wait on it
    assert f"cancelled {n} job(s)" in capsys.readouterr().out
    deadline, out = time.time() + 60, ""
    while time.time() < deadline:
        submitit.SlurmJob.watcher.clear()  # each CLI call is a new process: no sacct answer kept from the last one
        calls = submitit.SlurmJob.watcher.num_calls
        assert main([*args, "action=status"]) == 0
        assert submitit.SlurmJob.watcher.num_calls == calls + 1  # one sacct call for the grid
        out = capsys.readouterr().out
        if out.splitlines()[-1] == f"{n} job(s): {n} CANCELLED":
            break
        time.sleep(1)
    assert out.splitlines()[-1] == f"{n} job(s): {n} CANCELLED", out
    assert main([*args, "action=cancel"]) == 0
    assert "cancelled 0 job(s) (no job recorded on SLURM is pending or running)" in capsys.readouterr().out


def test_metric_bars_figure_draws_the_evaluated_rows(tmp_path):
    """grid=continuous's figure: one panel per metric column, from the evaluated rows (pending rows left out)."""
    from ablations.figures import draw

    grid = load_grid("continuous")
    rows = {"a": Outcome({"FAD": 1.0, "KL": 2.0, "CLAP": 3.0}), "b": Outcome({}, "pending"),
            "oracle": Outcome({"FAD": 0.5, "KL": None, "CLAP": 9.0})}
    paths = draw(grid, [], parse(["grid=continuous", f"out={tmp_path}"]), "cap", tmp_path, rows)
    assert {p.suffix for p in paths} == {".pdf", ".png"} and all(p.stat().st_size > 0 for p in paths)
    assert draw(grid, [], parse(["grid=continuous"]), "cap", tmp_path / "none", {"b": Outcome({}, "pending")}) == []


def test_slurm_states_of_jobs_that_will_not_finish_are_failed_and_held_ones_live():
    # PREEMPTED (PreemptMode=CANCEL) counted as neither, so the run exited 0 with no retry=true hint; held jobs
    # (REQUEUE_HOLD, SPECIAL_EXIT) and stopped ones counted as failed, so retry=true submitted a second copy
    from ablations.ledger import FINAL_BAD, LIVE

    assert {"PREEMPTED", "REVOKED", "NODE_FAIL", "CANCELLED"} <= FINAL_BAD
    assert {"REQUEUE_HOLD", "SPECIAL_EXIT", "STOPPED", "PENDING"} <= LIVE and not FINAL_BAD & LIVE


def test_set_keys_that_make_rows_one_cell_are_said_to(caplog):
    # set.rl.n=1 set.rl.align=anti_causal made Table 7 one cell under three row labels, each printing its numbers
    import logging

    with caplog.at_level(logging.WARNING, logger="ablations.plan"):
        assert len(_cells("table7", "demo", "set.rl.n=1", "set.rl.align=anti_causal")) == 1
    assert "table7: rows 'Anti-Causal, 1 model', 'Anti-Causal, 2 models', 'Causal, 1 model' are one cell under " \
           "set.rl.n=1 set.rl.align=anti_causal" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ablations.plan"):  # rows one cell by design: nothing to say
        _cells("continuous", "demo")
        _cells("table6", "demo", "set.train.steps=10")
    assert "one cell" not in caplog.text
