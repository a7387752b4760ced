"""Stage-1 trainer: optimiser groups, schedule, learning, exact resume, preemption signals, DDP."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from siren.config import ConfigError
from siren.data.sampler import EpochBatches
from siren.model import Expert
from siren.runtime import lr_at, param_groups
from siren.train import EXIT_PREEMPTED, TrainConfig, parse, read_log, train
from tests.fixtures_train import count_steps, random_tables, synthetic_data, tiny_config  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def losses(edir) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in read_log(edir) if not e.get("val")]


# ---------------------------------------------------------------------------- config

def test_cli_composes_model_and_train_config(tmp_path):
    cfg = parse([f"run_dir={tmp_path}", "expert=3", "scale=tiny", "model.distribution=6-2", "train.steps=200"])
    assert (cfg.expert, cfg.model.dim, cfg.model.distribution, cfg.train.steps) == (3, 64, "6-2", 200)
    with pytest.raises(ConfigError, match="train.steps"):
        parse(["train.step=3"])  # message lists the valid keys
    with pytest.raises(ConfigError, match="expert=6 does not exist in model.distribution=6-2"):
        parse(["expert=6"])
    with pytest.raises(ConfigError, match="precision"):
        parse(["train.precision=fp16"])
    assert parse(["model.distribution=1-12", "train.loss_layers=12"]).train.loss_layers == 12
    with pytest.raises(ConfigError, match=r"loss_layers=3: an expert of model.distribution=6-2 owns 2 layers"):
        parse(["model.distribution=6-2", "train.loss_layers=3"])
    with pytest.raises(ConfigError, match="train.loss_layers must be >= 0"):
        parse(["train.loss_layers=-1"])
    with pytest.raises(ConfigError, match="continuous family has no RVQ layers"):
        parse(["family=continuous", "train.loss_layers=1"])
    # the other family's preset or keys: scale=cont-tiny alone trained the paper-size discrete model (4.1 GB of
    # checkpoints), family=continuous with scale=tiny or model.* keys the continuous default
    with pytest.raises(ConfigError, match="scale=cont-tiny is a preset of the continuous family, but family=discrete"):
        parse(["scale=cont-tiny"])
    with pytest.raises(ConfigError, match="scale=tiny is a preset of the discrete family, but family=continuous"):
        parse(["family=continuous", "scale=tiny"])
    with pytest.raises(ConfigError, match="model.dim: keys of the other family's model, which family=continuous"):
        parse(["family=continuous", "scale=cont-tiny", "model.dim=32"])
    with pytest.raises(ConfigError, match="continuous.layers: keys of the other family's model"):
        parse(["scale=tiny", "continuous.layers=2"])
    with pytest.raises(ConfigError, match="arch: keys of the other family's model"):  # accepted, never read
        parse(["family=continuous", "scale=cont-tiny", "arch=legacy"])


# ---------------------------------------------------------------------------- optimiser

@pytest.mark.parametrize("arch, no_decay_names", [
    ("official", ("decoder.text_start.bias", "backbone.blocks.0.cross_attn.q.bias")),
    ("legacy", ("decoder.sos", "decoder.pos", "heads.0.bias"))])
def test_weight_decay_only_on_matrices(arch, no_decay_names):
    cfg = parse(["scale=tiny", "model.distribution=6-2", f"arch={arch}"]).model
    model = Expert(cfg, 1, random_tables())
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    names = {id(p): n for n, p in model.named_parameters()}
    assert ids(decay) | ids(no_decay) == set(names) and not ids(decay) & ids(no_decay)
    decayed = {names[i] for i in ids(decay)}
    # Independent listing: the weight matrices are the nn.Linear weights plus the 12 code projectors.
    linear = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert decayed == linear | {"embedding.weight"}
    for name in ("backbone.sos", "embedding.bias", "backbone.norm.weight", "backbone.blocks.0.norm_self.weight",
                 *no_decay_names):
        assert names[id(dict(model.named_parameters())[name])] not in decayed, name


def test_schedule_matches_closed_form():
    c = TrainConfig(steps=1000, warmup_steps=100, lr=1e-3, min_lr=1e-4)
    for s in range(100):  # linear warmup reaching lr at the last warmup step
        assert lr_at(s, c) == pytest.approx(1e-3 * (s + 1) / 100, rel=1e-12)
    for s in (100, 250, 550, 999):  # cosine from lr (step 100) to min_lr at the last step (999), as the authors'
        want = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * (s - 100) / 899))
        assert lr_at(s, c) == pytest.approx(want, rel=1e-12)
    assert lr_at(999, c) == pytest.approx(1e-4, rel=1e-12)
    assert lr_at(100, TrainConfig(steps=1001, warmup_steps=0, lr=1e-3, min_lr=1e-4)) == pytest.approx(
        1e-4 + 0.45e-3 * (1 + math.cos(math.pi * 0.1)))


def test_wsd_schedule_holds_then_decays_linearly():
    # a warmup longer than the run is cut to it, as the authors' train command does: the last step reaches lr
    long = TrainConfig(steps=300, warmup_steps=2000, lr=3e-4, min_lr=3e-5)
    assert [lr_at(s, long) for s in (0, 299)] == pytest.approx([3e-4 / 300, 3e-4], rel=1e-12)
    c = TrainConfig(steps=300, warmup_steps=20, lr=3e-3, min_lr=3e-4, schedule="wsd", decay_frac=0.2)
    assert [lr_at(s, c) for s in (0, 19)] == pytest.approx([3e-3 / 20, 3e-3], rel=1e-12)  # warmup as the cosine's
    assert all(lr_at(s, c) == 3e-3 for s in range(20, 241))  # held until the last 60 steps
    for s in (250, 270, 299):  # then linear from lr (step 240) to min_lr (step 300)
        assert lr_at(s, c) == pytest.approx(3e-3 - 2.7e-3 * (s - 240) / 60, rel=1e-12)
    # a decay longer than the steps after warmup starts where warmup ends
    short = TrainConfig(steps=10, warmup_steps=5, lr=1e-3, min_lr=0.0, schedule="wsd", decay_frac=0.9)
    assert lr_at(5, short) == 1e-3 and lr_at(9, short) == pytest.approx(2e-4, rel=1e-12)


def test_epoch_batches_partition_and_skip():
    n, B = 11, 2
    full = list(EpochBatches(n, B, seed=3, epoch=1))
    keys = sum(full, [])
    assert len(full) == 5 and {e for e, _ in keys} == {1}  # keys carry the epoch (it moves the crop)
    assert len({i for _, i in keys}) == 10  # a permutation; drop_last leaves one example out
    assert list(EpochBatches(n, B, seed=3, epoch=1, skip=4)) == full[2:]  # resume = same order minus consumed
    assert list(EpochBatches(n, B, seed=3, epoch=2)) != full  # each epoch reshuffles
    two = [list(EpochBatches(n, B, seed=3, epoch=1, rank=r, world=2)) for r in range(2)]
    glob = list(EpochBatches(n, 2 * B, seed=3, epoch=1))
    assert [a + b for a, b in zip(*two)] == glob  # ranks split each global batch
    # len() is each rank's count of batches: with drop_last=False the last short global batch may leave a rank none
    for n, w, skip, drop in [(10, 2, 0, False), (11, 3, 1, False), (9, 2, 3, True), (12, 3, 0, False)]:
        for r in range(w):
            s = EpochBatches(n, 4, rank=r, world=w, skip=skip, drop_last=drop, shuffle=False)
            assert len(s) == len(list(s)), (n, w, skip, drop, r)


# ---------------------------------------------------------------------------- learning

def test_tiny_expert_overfits_fixed_batches(tmp_path):
    cfg = tiny_config(tmp_path, "model.distribution=6-2", "expert=0", "train.steps=30", "train.warmup_steps=3",
                      "train.lr=1e-2", "train.min_lr=1e-3", "train.ckpt_every=1000")
    train(cfg, synthetic_data(n_train=4, frames=10, val=False), handle_signals=False)
    curve = [loss for _, loss in losses(tmp_path / "expert_0")]
    first, last = curve[0], sum(curve[-3:]) / 3
    assert first == pytest.approx(math.log(1024), rel=0.05)  # the mean of two owned layers at chance
    assert last < 0.5 * first, curve


@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_train_step_clips_the_global_gradient_norm(tmp_path, clip):
    """train.grad_clip: the optimiser gets the gradient scaled to norm grad_clip where it is longer (0: unclipped);
    plain SGD at lr 1 makes the update that gradient. The norm returned (logged) is the one before clipping."""
    from siren.data.dataset import collate
    from siren.loss_stats import Stats
    from siren.train import LossOf, build_model, train_step

    cfg = tiny_config(tmp_path, "model.distribution=6-2", "expert=0", f"train.grad_clip={clip}")
    data = synthetic_data()
    model = build_model(cfg, data)
    batch = collate([data.train[(0, i)] for i in range(2)])
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    norm = train_step(LossOf(model), torch.optim.SGD(params, lr=1.0), [batch], cfg.train, torch.device("cpu"),
                      Stats())
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params)]).norm()
    assert float(norm) > 0.5  # a fresh model's gradient is far longer than the clip
    assert float(step) == pytest.approx(clip if clip else float(norm), rel=1e-4)


@pytest.mark.parametrize("reduction,loss_layers", [("mean", 0), ("sum", 0), ("mean", 2)])
def test_log_records_every_owned_layer_and_schedule(tmp_path, reduction, loss_layers):
    cfg = tiny_config(tmp_path, "model.distribution=4-3", "expert=2", "train.steps=3", "train.val_every=2",
                      f"train.loss_reduction={reduction}", f"train.loss_layers={loss_layers}")
    train(cfg, synthetic_data(), handle_signals=False)
    log = read_log(tmp_path / "expert_2")
    steps = [e for e in log if not e.get("val")]
    assert [e["step"] for e in steps] == [1, 2, 3] and [e["step"] for e in log if e.get("val")] == [2, 3]
    for e in steps:
        assert e["lr"] == pytest.approx(lr_at(e["step"] - 1, cfg.train))
        assert {"loss", "grad_norm", "tokens/s", "ce/L7", "ce/L8", "ce/L9", "acc/L7", "acc/L8", "acc/L9"} <= set(e)
        assert not {"ce/L6", "ce/L10"} & set(e)
    for e in log:  # Eq. 6, training and validation: the layers' CEs averaged (official) or summed
        kept = [e[f"ce/L{j}"] for j in (7, 8, 9)][: loss_layers or 3]  # train.loss_layers: the first n of them
        assert e["loss"] == pytest.approx(sum(kept) / (len(kept) if reduction == "mean" else 1), rel=1e-5)
    assert any((tmp_path / "expert_2" / "tb").iterdir())


# ---------------------------------------------------------------------------- resume

def test_resume_reproduces_uninterrupted_run(tmp_path, monkeypatch):
    """Kill after the step-4 checkpoint, restart: steps 5..8 give the same losses, bit for bit.

    Tolerance: exact equality (CPU, fp32, one thread order). 6 clips / batch 2 = 3 batches per
    epoch, grad_accum 2: the run crosses epoch boundaries and the checkpoint falls mid-epoch. Dropout on (the
    paper-size experts' 0.1; tiny has none), so the restored global RNG is checked too: without it, nothing
    in a tiny step would draw from it."""
    args = ("model.distribution=6-2", "expert=0", "train.grad_accum=2", "model.dropout=0.1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_config(straight, *args), synthetic_data(), handle_signals=False)
    want = losses(straight / "expert_0")

    train(tiny_config(resumed, *args), synthetic_data(), handle_signals=False)
    # Make it look like the job died just after writing step 4 (the step-8 checkpoint never happened);
    # the log still holds the lost steps 5..8, which the restart must drop and recompute.
    edir = resumed / "expert_0"
    shutil.rmtree(edir / "step_00000008")
    (edir / "latest").write_text("step_00000004\n")
    with open(edir / "log.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 0.0}\n{"step": 10, "lo')  # a half-written line from the dead job
    resumed = shutil.move(resumed, tmp_path / "moved")  # and the run folder moved before the restart
    ran = count_steps(monkeypatch)
    result = train(tiny_config(resumed, *args), synthetic_data(), handle_signals=False)
    assert result.status == "finished" and result.step == 8 and len(ran) == 4  # steps 5..8 only
    got = losses(resumed / "expert_0")
    assert [s for s, _ in got] == list(range(1, 9))
    assert got == want


def test_a_resumed_log_entry_averages_the_same_steps(tmp_path, monkeypatch):
    """Entries every 3 steps, the checkpoint at step 4: the resumed run's step-6 entry averages steps 4..6, as the
    uninterrupted run's does (the running sums travel in the checkpoint), not 5..6 alone."""
    args = ("model.distribution=6-2", "expert=0", "train.log_every=3")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_config(straight, *args), synthetic_data(), handle_signals=False)
    train(tiny_config(resumed, *args), synthetic_data(), handle_signals=False)
    edir = resumed / "expert_0"
    shutil.rmtree(edir / "step_00000008")
    (edir / "latest").write_text("step_00000004\n")
    ran = count_steps(monkeypatch)
    train(tiny_config(resumed, *args), synthetic_data(), handle_signals=False)
    assert len(ran) == 4

    def entries(d):
        return [{k: v for k, v in e.items() if k != "tokens/s"} for e in read_log(d) if not e.get("val")]

    want = entries(straight / "expert_0")
    assert [e["step"] for e in want] == [3, 6, 8]
    assert entries(edir) == want


def test_a_first_ctrl_c_checkpoints_at_the_step_boundary_then_interrupts(tmp_path, monkeypatch):
    """Ctrl-C (SIGINT) stopped training at once: every step since the last periodic checkpoint was lost, under a
    message saying to run again to continue. Now the first one checkpoints at the step boundary, then the
    interrupt goes on to the handler before ours (the CLI's: exit 130); a second one stops at once."""
    import siren.train as T

    seen, real_lr_at = [], T.lr_at

    def lr_then_ctrl_c(step, cfg):  # Ctrl-C during optimiser step 2 (0-based); ckpt_every is 4
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr_at(step, cfg)

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(T, "lr_at", lr_then_ctrl_c)
    before = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))  # as the CLI's handler
    try:
        run = tmp_path / "run"
        result = train(tiny_config(run, "model.distribution=6-2", "train.ckpt_every=4"), synthetic_data(),
                       handle_signals=True)
        assert seen == [signal.SIGINT]  # handed on once the checkpoint was written
    finally:
        signal.signal(signal.SIGINT, before)
    assert result.status == "preempted" and result.checkpoint.name == "step_00000003"
    from siren.runtime import StopRequest

    stop = StopRequest()
    stop.install()
    try:
        stop(signal.SIGINT, None)
        with pytest.raises(KeyboardInterrupt):  # asked twice: now
            stop(signal.SIGINT, None)
    finally:
        stop.restore()
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job's: a `kill -INT` stays ignored
    try:
        stop = StopRequest()
        stop.install()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        stop.restore()
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_second_copy_of_a_training_job_is_refused(tmp_path):
    """The same job submitted twice appended to one log and raced the same step's checkpoint."""
    from siren.lock import LockHeld, hold

    edir = tmp_path / "run" / "expert_0"
    with hold(edir / "train.lock", "training of expert 0", "wait"):
        with pytest.raises(LockHeld, match=r"train\.lock: held by training of expert 0 .*wait for it to finish"):
            train(tiny_config(tmp_path / "run", "model.distribution=6-2"), synthetic_data(), handle_signals=False)
    assert not list(edir.glob("step_*")) and not (edir / "log.jsonl").exists()
    # ... before it writes anything: another seed's copy overwrote init.safetensors (Figure 7's task vectors) and
    # config.json of the run that went on training
    assert sorted(p.name for p in edir.iterdir()) == ["train.lock"] and not (tmp_path / "run" / "config.json").exists()


def test_signal_stops_at_step_boundary_and_resume_matches(tmp_path, monkeypatch):
    """SIGTERM arriving mid-step stops the loop after that step, with a checkpoint, and the run resumes exactly."""
    args = ("model.distribution=6-2", "expert=1", "model.dropout=0.1")  # dropout: the RNG is restored too
    straight = tmp_path / "straight"
    train(tiny_config(straight, *args), synthetic_data(), handle_signals=False)

    run = tmp_path / "run"
    import siren.train as T

    real_lr_at = T.lr_at

    def lr_then_signal(step, cfg):  # SIGTERM arrives during optimiser step 3 (0-based)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_lr_at(step, cfg)

    monkeypatch.setattr(T, "lr_at", lr_then_signal)
    result = train(tiny_config(run, *args), synthetic_data(), handle_signals=True)
    monkeypatch.setattr(T, "lr_at", real_lr_at)
    assert result.status == "preempted" and result.step == 4
    assert result.checkpoint.name == "step_00000004"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    state = json.loads((run / "expert_1" / "step_00000004" / "state.json").read_text())
    assert state["finished"] is False and state["step"] == 4
    ran = count_steps(monkeypatch)
    train(tiny_config(run, *args), synthetic_data(), handle_signals=False)
    assert len(ran) == 4 and losses(run / "expert_1") == losses(straight / "expert_1")
    # a signal in the last step: the run is finished, not preempted (exit 75 requeued a job that had nothing left)
    monkeypatch.setattr(T, "lr_at", lambda step, cfg: (step == 7 and os.kill(os.getpid(), signal.SIGTERM))
                        or real_lr_at(step, cfg))
    result = train(tiny_config(tmp_path / "last", *args), synthetic_data(), handle_signals=True)
    assert (result.status, result.step) == ("finished", 8)


def test_sigterm_inside_slurm_checkpoints_and_goes_on(tmp_path, monkeypatch):
    """Inside a SLURM job a SIGTERM (preemption, scancel) comes before SIGUSR2 or before SIGKILL: it did nothing,
    so a SIGKILL after it lost every step since the last periodic checkpoint. Now it checkpoints at the next step
    boundary and training goes on (SIGUSR2 still stops and requeues), to the same losses."""
    args = ("model.distribution=6-2", "expert=1")
    straight = tmp_path / "straight"
    train(tiny_config(straight, *args), synthetic_data(), handle_signals=False)
    import siren.train as T

    real_lr_at = T.lr_at

    def lr_then_signal(step, cfg):  # SIGTERM during optimiser step 1 (0-based); ckpt_every is 4
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_lr_at(step, cfg)

    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setattr(T, "lr_at", lr_then_signal)
    result = train(tiny_config(tmp_path / "run", *args), synthetic_data(), handle_signals=True)
    assert result.status == "finished" and result.step == 8
    assert sorted(p.name for p in (tmp_path / "run" / "expert_1").glob("step_*")) == [
        "step_00000002", "step_00000004", "step_00000008"]
    assert losses(tmp_path / "run" / "expert_1") == losses(straight / "expert_1")


SIGNAL_SCRIPT = """
import sys
from tests.fixtures_train import synthetic_data, tiny_args
from siren.train import main
sys.exit(main(tiny_args(sys.argv[1], "model.distribution=1-12", "train.steps=100000", "train.ckpt_every=100000",
                        "train.log_every=1", f"train.num_workers={sys.argv[2]}"), synthetic_data(int(sys.argv[3]))))
"""


@pytest.mark.parametrize("sig, workers", [(signal.SIGUSR2, 0), (signal.SIGTERM, 2)])
def test_slurm_signal_checkpoints_and_exits_for_requeue(tmp_path, sig, workers):  # workers: of an epoch of 1000 steps
    """A real training process receives SIGUSR2 (SLURM's warning before a time limit): it checkpoints
    at the next step boundary and exits with EXIT_PREEMPTED so the launcher requeues it. SIGTERM to the whole
    process group (as SLURM and a terminal send it) with loader workers: torch's handler ended the workers and the
    step failed ("DataLoader worker ... is killed by signal: Terminated", exit 1, no checkpoint)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SIGNAL_SCRIPT, str(tmp_path), str(workers), "2000" if workers
                             else "6"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    log = tmp_path / "expert_0" / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.time() < deadline, "training never logged a step"
        time.sleep(0.2)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err.decode()[-2000:]
    latest = (tmp_path / "expert_0" / "latest").read_text().strip()
    state = json.loads((tmp_path / "expert_0" / latest / "state.json").read_text())
    assert 2 <= state["step"] < 100000 and state["finished"] is False
    assert [e["step"] for e in read_log(tmp_path / "expert_0")][-1] == state["step"]
    assert b"requeue" in err


# ---------------------------------------------------------------------------- DDP

DDP_SCRIPT = """
import os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK=sys.argv[2], WORLD_SIZE="2",
                  LOCAL_RANK=sys.argv[2])
from tests.fixtures_train import synthetic_data, tiny_config
from siren.train import train
train(tiny_config(sys.argv[1], "model.distribution=6-2", "train.steps=6", "train.val_every=2", "train.log_every=3"),
      synthetic_data(n_train=8, n_val=2, ragged=False), handle_signals=False)
"""


def test_ddp_two_processes_equal_one_process_with_double_batch(tmp_path):
    """2 ranks x batch 2 see the same global batches as 1 process x batch 4 (equal-length clips,
    so the mean of the two halves' losses is the full batch's): same losses up to float sums. The 2 validation
    clips are rank 0's alone: rank 1's empty validation reduces zeros under the same keys (its short list on the
    CPU aborted the all-reduce). Then the DDP run
    resumed from its step-4 checkpoint (both ranks' RNG states, the log's sums totalled over ranks) logs the
    same entries again."""
    import socket

    def ddp_run(run_dir):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, "-c", DDP_SCRIPT, str(run_dir), str(r), port], cwd=ROOT,
                                  env=env, stderr=subprocess.PIPE) for r in range(2)]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err.decode()[-3000:]

    ddp_run(tmp_path / "ddp")
    train(tiny_config(tmp_path / "one", "model.distribution=6-2", "train.steps=6", "train.val_every=2",
                      "train.log_every=3", "train.batch_size=4"), synthetic_data(n_train=8, n_val=2, ragged=False),
          handle_signals=False)
    ddp, one = read_log(tmp_path / "ddp" / "expert_0"), read_log(tmp_path / "one" / "expert_0")
    assert [e["step"] for e in ddp] == [e["step"] for e in one] == [2, 3, 4, 6, 6]
    assert [sorted(e) for e in ddp] == [sorted(e) for e in one] and sum(bool(e.get("val")) for e in ddp) == 3
    for a, b in zip(ddp, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-5), (a, b)

    edir = tmp_path / "ddp" / "expert_0"
    shutil.rmtree(edir / "step_00000006")
    (edir / "latest").write_text("step_00000004\n")
    ddp_run(tmp_path / "ddp")
    again = read_log(edir)
    assert [e["step"] for e in again] == [2, 3, 4, 6, 6]
    for a, b in zip(again, ddp):
        assert {k: pytest.approx(v, rel=1e-6) for k, v in a.items() if k != "tokens/s"} == \
            {k: v for k, v in b.items() if k != "tokens/s"}
    state = json.loads((tmp_path / "ddp" / "expert_0" / "step_00000004" / "state.json").read_text())
    assert state["world_size"] == 2
    # one process resuming it trained on half the global batch (train.batch_size is per process), with a warning
    # about the RNG states only: refused
    shutil.rmtree(edir / "step_00000006")
    (edir / "latest").write_text("step_00000004\n")
    with pytest.raises(ConfigError, match="trained on 2 processes, this run has 1"):
        train(tiny_config(tmp_path / "ddp", "model.distribution=6-2", "train.steps=6", "train.val_every=2",
                          "train.log_every=3"), synthetic_data(n_train=8, n_val=2, ragged=False), handle_signals=False)


# ---------------------------------------------------------------------------- benchmark

def test_bench_matches_parameters_and_prints_table(capsys):
    from benchmarks.train import main, matched_single, scale_config
    from siren.model.params import model_params

    siren_cfg = scale_config("small", "6-2")
    single = matched_single(siren_cfg)
    target = sum(p.total for p in model_params(siren_cfg))
    per_layer = model_params(dataclasses.replace(single, main_layers=2))[0].total - \
        model_params(dataclasses.replace(single, main_layers=1))[0].total
    assert single.distribution == "1-12" and single.dim == siren_cfg.dim
    assert abs(model_params(single)[0].total - target) <= per_layer / 2  # the closest depth
    main(["scale=tiny", "batch_size=1", "crop_s=0.2", "steps=1"])
    out = capsys.readouterr().out
    assert "| 6-2 expert (tiny" in out and "| 1-12 single" in out and "frames/s" in out


def test_expert_seed_shared_or_offset_as_the_authors(tmp_path):
    """shared (App. D.3): every expert starts from the same weights; offset: seed + the expert's first layer, as the
    authors' train command seeds each expert (init, batches and dropout of its own)."""
    from safetensors.torch import load_file

    def inits(mode):
        run = tmp_path / mode
        for k in (0, 1):
            train(tiny_config(run, "model.distribution=2-6", f"expert={k}", "train.steps=1", "train.ckpt_every=1",
                              f"train.expert_seed={mode}"), synthetic_data(), handle_signals=False)
        a, b = (load_file(run / f"expert_{k}" / "init.safetensors") for k in (0, 1))
        return a["heads.0.weight"], b["heads.0.weight"]

    assert torch.equal(*inits("shared"))
    offset = inits("offset")
    assert not torch.equal(*offset) and torch.equal(offset[0], inits("shared")[0])  # expert 0: seed + 0
    with pytest.raises(ConfigError, match="train.expert_seed must be one of shared, offset"):
        tiny_config(tmp_path / "x", "train.expert_seed=own")


@pytest.mark.parametrize("cuda, backend", [(False, "gloo"), (True, "cpu:gloo,cuda:nccl")])
def test_process_group_sends_cpu_tensors_to_gloo_where_cuda_exists(monkeypatch, cuda, backend):
    """A train.device=cpu run with several processes on a GPU node: its collectives carry CPU tensors, which NCCL
    refuses; the group maps each device to its backend (torch parses the string as below)."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import Backend, BackendConfig

    from siren import runtime

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(dist, "init_process_group", asked.append)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert runtime.init_distributed().world == 2 and asked == [backend]
    assert BackendConfig(Backend(backend)).get_device_backend_map()["cpu"] == "gloo"


def test_a_cpu_run_on_a_gpu_node_does_not_pin_its_batches(tmp_path, monkeypatch):
    """The loaders pinned batches wherever CUDA existed: a train.device=cpu run on a GPU node copied every batch
    into page-locked memory for nothing (and held the pinning thread). Now only a run on a GPU pins them."""
    from siren import train as trainer

    made = []
    real = trainer.epoch_loader
    monkeypatch.setattr(trainer, "epoch_loader", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = tiny_config(tmp_path, "model.distribution=6-2", "expert=0", "train.steps=2", "train.val_every=2",
                      "train.device=cpu")
    train(cfg, synthetic_data(n_train=4, frames=10), handle_signals=False)
    assert len(made) == 2 and not any(loader.pin_memory for loader in made)  # training's and validation's


def test_experts_of_one_run_trained_with_other_train_keys_are_said_to_be(tmp_path, caplog):
    # each expert is its own job with its own command line: expert 1 at another lr and seed loaded as one model
    # with the others, and the cards and probes described it by expert 0's keys, without a word
    import logging

    import siren

    data = synthetic_data()
    train(tiny_config(tmp_path, "model.distribution=2-6", "train.steps=2", "expert=0"), data, handle_signals=False)
    train(tiny_config(tmp_path, "model.distribution=2-6", "train.steps=2", "expert=1", "train.lr=1e-2",
                      "train.seed=7", "train.log_every=2"), data, handle_signals=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="siren.run_dir"):
        siren.load(tmp_path)
    assert "its experts were trained with other train keys: train.lr: expert 0 0.003, expert 1 0.01; train.seed: " \
           "expert 0 0, expert 1 7; its cards and probes describe it by expert 0's" in caplog.text  # not log_every
