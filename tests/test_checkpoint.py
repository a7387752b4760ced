"""Checkpoints: exact round trip, atomic writes, clear errors for bad files and configs, siren.load."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import siren
from siren import checkpoint as ckpt
from siren import io, run_dir
from siren.checkpoint import CheckpointError
from siren.model import CollaborativeModel
from siren.train import train
from tests.fixtures_train import count_steps, synthetic_data, tiny_config  # noqa: F401


def memory_growth_mb(setup: str, measured: str) -> tuple[float, float, str]:
    """Runs ``setup``, then ``measured``, in a fresh Python; returns by how many MB its resident memory peaked above
    where ``measured`` began (the kernel's high-water mark, reset by ``/proc/self/clear_refs``; mapped file pages
    read count), by how many MB its anonymous memory (the process's own, no file's pages) grew by the end, and what
    it printed. ``ru_maxrss`` could not measure this: a child starts with its parent's peak (Linux keeps it over
    fork and exec), so inside a pytest worker that had trained a model a child's 300 MB went unseen."""
    code = (f"{setup}\n"
            "def mb(key):\n"
            "    return int(next(x for x in open('/proc/self/status') if x.startswith(key)).split()[1]) / 1024\n"
            "open('/proc/self/clear_refs', 'w').write('5'); before, anon = mb('VmRSS:'), mb('RssAnon:')\n"
            f"{measured}\n"
            "print(mb('VmHWM:') - before, mb('RssAnon:') - anon)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    peak, anon = map(float, out[-2].split())
    return peak, anon, "\n".join(out[:-2])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Expert 0 of a 6-2 tiny model trained 8 steps (checkpoints at 4 and 8)."""
    run = tmp_path_factory.mktemp("run")
    cfg = tiny_config(run, "model.distribution=6-2", "expert=0")
    train(cfg, synthetic_data(), handle_signals=False)
    return run


def fresh_copy(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def copy_at_step_4(trained, tmp_path):
    """A fresh copy whose expert 0 resumes from its step-4 checkpoint; returns the run dir."""
    run = fresh_copy(trained, tmp_path)
    shutil.rmtree(run / "expert_0" / "step_00000008")
    (run / "expert_0" / "latest").write_text("step_00000004\n")
    return run


def test_layout_and_round_trip_bit_identical(trained, tmp_path):
    from siren.model import Expert

    edir = trained / "expert_0"
    assert (edir / "latest").read_text().strip() == "step_00000008"
    c = ckpt.load_latest(edir)
    assert c.step == 8 and c.state["finished"] is True and c.state["expert"] == 0
    assert c.state["codec"] == {"id": "test-tables", "weights": "random"}
    assert c.state["text"] == {"id": "test-text", "weights": "random"}
    assert c.state["model"]["dim"] == 32 and c.state["train"]["steps"] == 8
    run_cfg = json.loads((trained / "config.json").read_text())
    assert run_cfg == {key: c.state[key] for key in ("model", "codec", "text")}
    assert run_cfg["model"]["codec"] == "test-tables"

    # weights: save -> load into a fresh expert -> save again: every tensor bit-identical
    cfg = tiny_config(tmp_path, "model.distribution=6-2").model
    expert = Expert(cfg, 0)
    ckpt.load_weights(expert, c.model_state(), c.path)
    again = tmp_path / "again.safetensors"
    io.save_tensors(again, expert.state_dict())
    a, b = c.model_state(), ckpt.read_tensors(again)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) and a[n].dtype == b[n].dtype for n in a)
    # the frozen code tables travel with the weights (buffers), so loading needs no codec
    assert not torch.equal(a["embedding.codebooks"], torch.zeros_like(a["embedding.codebooks"]))

    # trainer state: AdamW moments for every parameter, RNG as uint8, scalars in JSON
    t = c.trainer_state()
    n_params = sum(1 for _ in expert.parameters())
    assert sum(1 for n in t if n.endswith(".exp_avg")) == n_params
    assert t["rng.cpu.rank0"].dtype == torch.uint8
    assert {"epoch", "examples_in_epoch"} <= set(c.state) and c.state["optimizer"]["param_groups"][0]["lr"] > 0
    # a resume puts the optimizer's moments on its parameters' device as each is read (a GPU run held all of them
    # in host memory first); its step counts, RNG states and the log's sums stay on the CPU, as in a fresh run
    # (a step on the GPU cost a non-fused AdamW a wait per parameter). "meta" stands for the GPU.
    on = {n: str(v.device) for n, v in c.trainer_state("meta").items()}
    moments = {n for n in on if n.startswith("optim.") and not n.endswith(".step")}
    assert {on[n] for n in moments} == {"meta"} and {n.rsplit(".", 1)[1] for n in moments} == {"exp_avg", "exp_avg_sq"}
    assert {d for n, d in on.items() if n not in moments} == {"cpu"} and "rng.cpu.rank0" in on
    assert any(n.endswith(".step") for n in on)


def test_keep_last_and_pointer(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, "model.distribution=6-2", "train.ckpt_every=1", "train.keep_last=2"),
          synthetic_data(), handle_signals=False)
    steps = sorted(p.name for p in (run / "expert_0").glob("step_*"))
    assert steps == ["step_00000007", "step_00000008"]
    assert not list((run / "expert_0").glob(".*tmp*"))


def test_crash_during_save_keeps_previous_checkpoint(trained, tmp_path, monkeypatch):
    edir = fresh_copy(trained, tmp_path) / "expert_0"
    c = ckpt.load_latest(edir)
    real = io.save_tensors

    def dies_on_trainer_state(dest, tensors, metadata=None):
        if str(dest).endswith("trainer.safetensors"):
            raise OSError("disk full")
        return real(dest, tensors, metadata)

    monkeypatch.setattr(io, "save_tensors", dies_on_trainer_state)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(edir, 12, c.model_state(), c.trainer_state(), c.state, keep_last=1)
    assert ckpt.latest(edir).name == "step_00000008"  # still the last complete one
    assert not (edir / "step_00000012").exists() and not list(edir.glob(".step_*"))
    assert (edir / "step_00000004").exists()  # nothing deleted by the failed save


def test_missing_latest_pointer_falls_back_to_newest_complete_dir(trained, tmp_path):
    edir = fresh_copy(trained, tmp_path) / "expert_0"
    (edir / "latest").unlink()  # killed between renaming the step dir and writing `latest`
    assert ckpt.latest(edir).name == "step_00000008"


def test_resume_with_other_model_config_names_keys(trained, tmp_path):
    run = fresh_copy(trained, tmp_path)
    with pytest.raises(CheckpointError) as e:
        train(tiny_config(run, "model.distribution=6-2", "model.dim=64", "model.main_layers=2"), synthetic_data(),
              handle_signals=False)
    msg = str(e.value)
    assert "expert_0/step_00000008" in msg  # names the checkpoint
    assert "model.dim=32" in msg and "model.dim=64" in msg and "model.main_layers=1" in msg
    with pytest.raises(CheckpointError, match=r"train.lr=0.003.*train.lr=0.001"):
        train(tiny_config(run, "model.distribution=6-2", "train.lr=1e-3"), synthetic_data(), handle_signals=False)
    # more steps on a finished run: the way forward is named (it said which keys may change, not what to do)
    with pytest.raises(CheckpointError, match=r"train.steps=8.*train into another run_dir= \(train.steps sets the "
                                              r"learning-rate schedule, so a run cannot be extended\)"):
        train(tiny_config(run, "model.distribution=6-2", "train.steps=12"), synthetic_data(), handle_signals=False)
    # bookkeeping keys may change on resume
    result = train(tiny_config(run, "model.distribution=6-2", "train.log_every=5"), synthetic_data(),
                   handle_signals=False)
    assert result.status == "finished"


def test_checkpoint_saved_before_the_schedule_key_resumes_as_cosine(trained, tmp_path, monkeypatch):
    """Runs saved before train.schedule existed trained with the cosine (and before train.loss_layers,
    with every layer in the loss): they resume under it, to the same weights as the uninterrupted run,
    and are refused under wsd or loss_layers=1, naming the key."""
    run = copy_at_step_4(trained, tmp_path)
    edir = run / "expert_0"
    state_file = edir / "step_00000004" / "state.json"
    state = json.loads(state_file.read_text())
    del state["train"]["schedule"], state["train"]["decay_frac"], state["train"]["loss_layers"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"train.schedule='cosine'.*train.schedule='wsd'"):
        train(tiny_config(run, "model.distribution=6-2", "train.schedule=wsd"), synthetic_data(), handle_signals=False)
    with pytest.raises(CheckpointError, match=r"train.loss_layers=0.*train.loss_layers=1"):
        train(tiny_config(run, "model.distribution=6-2", "train.loss_layers=1"), synthetic_data(), handle_signals=False)
    ran = count_steps(monkeypatch)
    result = train(tiny_config(run, "model.distribution=6-2"), synthetic_data(), handle_signals=False)
    assert result.status == "finished" and result.step == 8 and len(ran) == 4
    want, got = ckpt.load_latest(trained / "expert_0").model_state(), ckpt.load_latest(edir).model_state()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_checkpoint_under_the_former_weight_decay_default_names_the_key_to_resume_with(trained, tmp_path):
    """train.weight_decay's default was 0.1 until 2026-12-07 (the authors' 0.05 since): a run saved under it is
    refused on resume with the key that resumes it; given it, it resumes. Another value given is only the diff."""
    run = copy_at_step_4(trained, tmp_path)
    state_file = run / "expert_0" / "step_00000004" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["train"]["weight_decay"] == 0.05  # the default the fixture trained with
    state["train"]["weight_decay"] = 0.1
    state_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"train.weight_decay=0.1.*train.weight_decay=0.05\. .*was the default "
                                              r"until 2026-12-07: .* resume with train.weight_decay=0.1\."):
        train(tiny_config(run, "model.distribution=6-2"), synthetic_data(), handle_signals=False)
    with pytest.raises(CheckpointError) as e:
        train(tiny_config(run, "model.distribution=6-2", "train.weight_decay=0.2"), synthetic_data(),
              handle_signals=False)
    assert "was the default" not in str(e.value)
    result = train(tiny_config(run, "model.distribution=6-2", "train.weight_decay=0.1"), synthetic_data(),
                   handle_signals=False)
    assert result.status == "finished" and result.step == 8


def test_an_expert_started_with_other_train_keys_than_its_siblings_is_warned_of(trained, tmp_path, caplog):
    """Each expert's job takes its own command line: one started after train.weight_decay's default changed (or with
    another lr) trained beside the others without a word, and the run loaded as one model."""
    import logging

    run = fresh_copy(trained, tmp_path)
    with caplog.at_level(logging.WARNING, logger="siren.run_dir"):
        train(tiny_config(run, "model.distribution=6-2", "expert=1", "train.weight_decay=0.2"), synthetic_data(),
              handle_signals=False)
    assert "its experts are trained with other train keys: train.weight_decay: expert 0 0.05, expert 1 0.2;" in \
        caplog.text


def test_second_expert_with_other_model_rejected_by_run_config(trained, tmp_path):
    run = fresh_copy(trained, tmp_path)
    with pytest.raises(CheckpointError, match=r"config.json.*model.dim=32.*model.dim=48"):
        train(tiny_config(run, "model.distribution=6-2", "expert=1", "model.dim=48"), synthetic_data(),
              handle_signals=False)
    assert [p.name for p in (run / "expert_1").iterdir()] == ["train.lock"]  # taken first: nothing else written


def test_a_damaged_run_config_is_not_answered_with_deleting_the_run(tmp_path):
    """A run's own config.json that does not parse was answered with the checkpoint fix, which named the run's folder
    and its parent's `latest`: "delete <run> and <parent>/latest". Not a JSON object, or without its model: a
    KeyError / AttributeError in the probes."""
    from siren.run_dir import read_run_config

    run = tmp_path / "run"
    run.mkdir()
    for text, words in (('{"model": ', "corrupt run file"), ("[1]", "is not a run's config"),
                        ('{"codec": {}}', "is not a run's config")):
        (run / "config.json").write_text(text)
        with pytest.raises(CheckpointError, match=rf"{words}.*restore it") as e:
            read_run_config(run)
        assert "delete" not in str(e.value) and str(run / "config.json") in str(e.value)


def test_a_state_json_of_another_shape_is_named(trained, tmp_path):
    # valid JSON, not a checkpoint's state: an AttributeError ([1]) or KeyError ('model', 'finished') traceback
    run = copy_at_step_4(trained, tmp_path)
    path = run / "expert_0" / "step_00000004" / "state.json"
    state = json.loads(path.read_text())
    for text, words in (("[1]", "no format, step"), (json.dumps({"format": state["format"], "step": 4}),
                                                     "no model, expert, train")):
        path.write_text(text)
        with pytest.raises(CheckpointError, match=rf"state.json: not a checkpoint's state \({words}\); delete "):
            train(tiny_config(run, "model.distribution=6-2"), synthetic_data(), handle_signals=False)
    run = fresh_copy(trained, tmp_path / "b")
    path = run / "expert_0" / "step_00000008" / "state.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "finished"}))
    with pytest.raises(CheckpointError, match=r"not a checkpoint's state \(no finished\)"):
        siren.load(run, allow_unfinished=True)


@pytest.mark.parametrize("victim", ["model.safetensors", "trainer.safetensors", "state.json"])
def test_corrupt_or_missing_file_is_named(trained, tmp_path, victim):
    run = copy_at_step_4(trained, tmp_path)
    path = run / "expert_0" / "step_00000004" / victim
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated (node died mid-copy)
    with pytest.raises(CheckpointError, match=f"corrupt checkpoint file {path}.*delete {path.parent} and "
                                              f"{path.parent.parent / 'latest'}"):
        train(tiny_config(run, "model.distribution=6-2"), synthetic_data(), handle_signals=False)
    path.unlink()
    with pytest.raises(CheckpointError, match=f"missing checkpoint file {path}"):
        train(tiny_config(run, "model.distribution=6-2"), synthetic_data(), handle_signals=False)
    # what the error says to do: that step and `latest` deleted, the run goes on from the newest complete one
    # (it said "delete this checkpoint directory", and then `latest` named a missing step)
    shutil.rmtree(path.parent)
    (run / "expert_0" / "latest").unlink()
    assert train(tiny_config(run, "model.distribution=6-2"), synthetic_data(), handle_signals=False).step == 8


@pytest.mark.parametrize("victim", ["model.safetensors", "trainer.safetensors"])
def test_a_flipped_byte_inside_a_tensor_is_named(trained, tmp_path, victim):
    """safetensors has no checksum: a byte changed inside a tensor's data (a damaged disk or copy) loaded as a
    slightly other model or optimiser state. state.json records each file's sha256 when it is written."""
    run = copy_at_step_4(trained, tmp_path)
    path = run / "expert_0" / "step_00000004" / victim
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # the last tensor's data: its header still parses
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"corrupt checkpoint file {path}: its sha256 .* when it was written.*"
                                              f"delete {path.parent} and"):
        train(tiny_config(run, "model.distribution=6-2"), synthetic_data(), handle_signals=False)
    # a checkpoint written before the digests were recorded loads as before (unchecked)
    state = run / "expert_0" / "step_00000004" / "state.json"
    saved = json.loads(state.read_text())
    del saved["sha256"]
    state.write_text(json.dumps(saved))
    assert ckpt.Checkpoint(state.parent).model_state()


def test_a_checked_read_holds_no_second_copy_of_the_file(tmp_path):
    """The digest check read the whole file into memory and loaded the tensors beside it: a 3.3B model's AdamW
    state (about 27 GB) held twice at once. Now hashed in chunks, then loaded; measured in a fresh process."""
    path, t = tmp_path / "trainer.safetensors", torch.randn(50_000_000)
    io.save_tensors(path, {"exp_avg": t}, {"format": "pt"})  # 200 MB
    peak, _, out = memory_growth_mb(
        "import torch; from siren import checkpoint",
        f"t = checkpoint.read_tensors(checkpoint.Path({str(path)!r}), {io.sha256_file(path)!r})\n"
        "print(float(t['exp_avg'][-1]))")
    assert peak < 50 and float(out) == float(t[-1])  # MB: 4 here (the file is mapped), 383 before


def test_tensor_files_are_safetensors_own_bytes(tmp_path):
    """``io.save_tensors`` writes the format itself (tensor by tensor): its files must be the bytes safetensors'
    own ``save_file`` writes, for every dtype it stores, views, scalars, empty and non-ASCII-named tensors."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(3, 5, generator=g), "w.T": torch.randn(4, 3, generator=g).t(), "é": torch.ones(2),
               "scalar": torch.tensor(7), "empty": torch.zeros(0, 4, dtype=torch.bool),
               "offset": torch.arange(20.0)[5:9], "rows": torch.arange(20).view(4, 5)[1:3]}  # views inside storage
    tensors |= {f"x.{t}": torch.randn(6, generator=g).mul(9).to(t)
                for t in (torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int16, torch.int8,
                          torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn,
                          torch.float8_e5m2)}
    for metadata in (None, {}, {"format": "pt"}):
        ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
        digest = io.save_tensors(ours, tensors, metadata)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(theirs), metadata=metadata)
        assert ours.read_bytes() == theirs.read_bytes()
        assert digest == io.sha256_file(ours)
    # several metadata keys: safetensors writes them in another order in each process; here in one (sorted)
    many = {"zeta": "1", "alpha": "2", "format": "pt"}
    io.save_tensors(ours, tensors, many)
    assert ours.read_bytes()[8:].startswith(b'{"__metadata__":{"alpha":"2","format":"pt","zeta":"1"}')
    from safetensors import safe_open
    with safe_open(str(ours), "pt") as f:
        assert f.metadata() == many and all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
    with pytest.raises(TypeError, match="complex64"):
        io.save_tensors(tmp_path / "c.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)})


def test_a_save_holds_one_tensors_host_copy_at_a_time(tmp_path):
    """Saving a GPU run's state copied every tensor to the host before writing the first (a 3.3B model's AdamW
    state: 26 GB of host memory in the saving process, rank 0, at each checkpoint). A CPU tensor's ``.cpu()`` is
    itself, so here it returns a copy, as a GPU tensor's does; measured in a fresh process."""
    peak, _, _ = memory_growth_mb(
        "import torch; from pathlib import Path; from siren import checkpoint\n"
        "torch.Tensor.cpu = lambda self: self.clone()  # what a GPU tensor's .cpu() gives: a new host tensor\n"
        "t = {f'optim.{i}.exp_avg': torch.randn(12_500_000) for i in range(6)}\n"  # 6 x 50 MB
        "checkpoint.check_finite(t, 'warm-up')",  # its temporaries before the measure
        f"checkpoint.save(Path({str(tmp_path)!r}), 3, t, t, {{}}, keep_last=1)")
    assert peak < 120  # MB over the tensors' own: 83 here (one 50 MB copy at a time, and the finiteness check's
    # temporaries, 1.75 tensors, which a GPU holds in its own memory), 287 before
    c = ckpt.load_latest(tmp_path)
    assert set(c.model_state()) == set(c.trainer_state()) == {f"optim.{i}.exp_avg" for i in range(6)}


def test_a_resumes_reads_hold_no_host_copy_of_the_state(tmp_path):
    """A resume reads its weights and optimizer state as views of safetensors' mapping of the files: their pages
    are the page cache's, which the kernel may drop, not the process's own memory (a copy of a 3.3B model's AdamW
    state would be 26 GB per process). Every page is read here, as a copy to the GPU would."""
    w = {f"w{i}": torch.randn(6_250_000) for i in range(4)}  # 4 x 25 MB, and their moments: 200 MB
    t = {f"optim.{i}.{m}": v for i, v in enumerate(w.values()) for m in ("exp_avg", "exp_avg_sq")}
    ckpt.save(tmp_path, 3, w, t, {}, keep_last=1)
    peak, anon, out = memory_growth_mb(
        f"from pathlib import Path; from siren import checkpoint; c = checkpoint.load_latest(Path({str(tmp_path)!r}))",
        "s = [c.model_state(), c.trainer_state()]\nprint(sum(float(v.double().sum()) for d in s for v in d.values()))")
    assert float(out) == pytest.approx(sum(float(v.double().sum()) for d in (w, t) for v in d.values()))
    assert peak > 250 and anon < 60  # MB: the 300 MB of the files resident; 0.2 MB own here, 286 if the reads copied


def test_a_killed_jobs_half_written_step_is_removed_by_a_later_save(tmp_path):
    # `kill -9` mid-save leaves .step_N.tmp-<pid>: only this process's own were removed, so at paper scale each
    # such leftover kept a whole checkpoint's disk for good; a live writer's (young) one stays
    import os
    import time

    edir = tmp_path / "expert_0"
    stale, young = edir / ".step_00000002.tmp-99999", edir / ".step_00000004.tmp-99998"
    for d in (stale, young):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"x" * 10)
    old = time.time() - ckpt.STALE_S - 60
    os.utime(stale, (old, old))
    ckpt.save(edir, 6, {"w": torch.zeros(2)}, {}, {}, keep_last=2)
    assert not stale.exists() and young.is_dir() and (edir / "step_00000006").is_dir()


def test_a_kill_while_a_rewritten_step_is_deleted_keeps_a_loadable_step(tmp_path, monkeypatch):
    """A step written again (stage 2 re-saving its start, a resume replaying a step whose `latest` was never
    written) moved the old folder aside and deleted it before moving the new one in: killed during that delete
    (minutes for a paper-scale checkpoint), `latest` named a folder that was not there and the run restarted
    from step 0. Now the new folder is in place first."""
    edir = tmp_path / "expert_0"
    ckpt.save(edir, 10, {"w": torch.zeros(2)}, {}, {}, keep_last=2)
    real = shutil.rmtree

    def killed_deleting_the_old_one(path, *args, **kwargs):
        if ".old-" in str(path) and os.path.exists(path):
            raise KeyboardInterrupt  # the job killed here
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_deleting_the_old_one)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(edir, 10, {"w": torch.ones(2)}, {}, {}, keep_last=2)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real)
    last = ckpt.load_latest(edir)
    assert last.step == 10 and torch.equal(last.model_state()["w"], torch.ones(2))


def test_run_config_is_readable_as_the_other_files(trained):
    """config.json was created by mkstemp and linked into place with its mode, 0600: in a group-shared run
    folder another member's expert job could not read it. It now has the mode every other file gets."""
    from siren import io

    assert (trained / "config.json").stat().st_mode & 0o777 == io.default_mode()


def test_latest_pointing_nowhere_is_named(trained, tmp_path):
    edir = fresh_copy(trained, tmp_path) / "expert_0"
    (edir / "latest").write_text("step_00000099\n")
    with pytest.raises(CheckpointError, match=f"{edir / 'latest'} names 'step_00000099'"):
        ckpt.latest(edir)


@pytest.mark.parametrize("escape", ["../../other/expert_0/step_00000008", "{other}/expert_0/step_00000008"])
def test_latest_pointing_outside_its_folder_is_refused(trained, tmp_path, escape):
    """The pointer names a step directory of *this* expert: one that leads to another run's existing
    checkpoint (relative or absolute) is an error, not a silent load of foreign weights."""
    run = fresh_copy(trained, tmp_path)
    other = tmp_path / "other"
    shutil.copytree(trained, other)
    edir = run / "expert_0"
    pointer = escape.format(other=other)
    assert (edir / pointer).is_dir()  # the escape leads to a real checkpoint directory
    (edir / "latest").write_text(pointer + "\n")
    with pytest.raises(CheckpointError, match="not a checkpoint directory in"):
        ckpt.latest(edir)


def test_safetensors_with_wrong_tensors_is_named(trained, tmp_path):
    from siren.model import Expert

    c = ckpt.load_latest(trained / "expert_0")
    other = Expert(tiny_config(tmp_path, "model.distribution=6-2", "model.dim=16").model, 0)
    with pytest.raises(CheckpointError,
                       match=r"model.safetensors does not fit this model: .* is \(.*32.*\) in the file"):
        ckpt.load_weights(other, c.model_state(), c.path / "model.safetensors")


# ---------------------------------------------------------------------------- siren.load

def test_load_assembles_all_experts_and_reports_missing(tmp_path):
    run = tmp_path / "run"
    args = ("model.distribution=2-6", "train.steps=2", "train.ckpt_every=1")
    data = synthetic_data()
    train(tiny_config(run, *args, "expert=1"), data, handle_signals=False)
    with pytest.raises(CheckpointError, match=r"expert 0: missing") as e:
        siren.load(run)
    assert "expert 1" not in str(e.value)

    train(tiny_config(run, "model.distribution=2-6", "train.ckpt_every=1", "expert=0", "train.steps=3"), data,
          handle_signals=False)
    # expert 0 is finished under its own train.steps=3; make expert 1 look interrupted at step 1
    (run / "expert_1" / "latest").write_text("step_00000001\n")
    with pytest.raises(CheckpointError, match=r"expert 1: unfinished, latest checkpoint step_00000001 is step 1 of 2"):
        siren.load(run)
    partial = siren.load(run, allow_unfinished=True)
    (run / "expert_1" / "latest").write_text("step_00000002\n")

    model = siren.load(run, device="cpu")
    assert isinstance(model, CollaborativeModel) and len(model.experts) == 2 and not model.training
    for k in range(2):
        saved = ckpt.load_latest(run / f"expert_{k}").model_state()
        own = model.experts[k].state_dict()
        assert all(torch.equal(own[n], saved[n]) for n in saved)
    assert not torch.equal(partial.experts[1].heads[0].weight, model.experts[1].heads[0].weight)

    # the assembled model computes what the trained experts compute: 12 layers of logits
    b = data.collate([data.train[(0, i)] for i in range(2)])
    logits = model(b["codes"], b["text"], b["text_mask"])
    assert logits.shape == (*b["codes"].shape, 1024)


def test_load_rejects_expert_of_another_model(tmp_path):
    run = tmp_path / "run"
    args = ("model.distribution=2-6", "train.steps=1")
    train(tiny_config(run, *args, "expert=0"), synthetic_data(), handle_signals=False)
    train(tiny_config(run, *args, "expert=1"), synthetic_data(), handle_signals=False)
    state = run / "expert_1" / "step_00000001" / "state.json"
    s = json.loads(state.read_text())
    s["model"]["conditioning"] = "residual"
    state.write_text(json.dumps(s))
    with pytest.raises(CheckpointError, match=r"expert 1: .* model.conditioning='residual' \(run config.json: "
                                              r"'accumulated'\)"):
        siren.load(run)
    # expert folders swapped: every expert has the same shapes, so each loaded into the other's slot silently
    s["model"]["conditioning"] = "accumulated"
    state.write_text(json.dumps(s))
    siren.load(run)
    # one expert trained again on another data_dir (each checkpoint records its split's digest): loaded silently
    for k, digest in ((0, "aaaa"), (1, "bbbb")):
        f = run / f"expert_{k}" / "step_00000001" / "state.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "data": {"train": digest}}))
    with pytest.raises(CheckpointError, match="trained on different train splits .*: expert 0 aaaa, expert 1 bbbb"):
        siren.load(run)
    state.write_text(json.dumps(s))
    (run / "expert_0").rename(run / "x")
    (run / "expert_1").rename(run / "expert_0")
    (run / "x").rename(run / "expert_1")
    with pytest.raises(CheckpointError, match=r"expert 0: .*expert_0/step_00000001 is expert 1's checkpoint"):
        siren.load(run)
    with pytest.raises(CheckpointError, match="is not a run directory"):
        siren.load(tmp_path / "nothing")


def test_trained_length_is_read_beside_the_launchers_done_markers(tmp_path, caplog):
    """A grid's run folder holds expert_<k>.done markers beside expert_<k>/; they are not experts (reading one as
    an expert without checkpoints hid the trained length, so generating past it was never warned about)."""
    run = tmp_path / "run"
    data = synthetic_data(frames=12, ragged=False)
    data.train.max_frames = 12  # as siren.data's datasets report it (the longest sequence the expert sees)
    for k in range(2):
        train(tiny_config(run, "model.distribution=2-6", f"expert={k}", "train.steps=1"), data, handle_signals=False)
        (run / f"expert_{k}.done").write_text("")  # the launcher's markers (ablations/plan.py)
        (run / f"expert_{k}.done.lock").write_text("")
    assert [p.name for p in ckpt.expert_dirs(run)] == ["expert_0", "expert_1"]
    assert run_dir.trained_frames(run) == 12
    with caplog.at_level("WARNING", logger="siren.checkpoint"):
        run_dir.warn_if_past_trained(run, 500, "eval")
    assert "eval generates 500 frames (10.0 s)" in caplog.text and "at most 12 frames" in caplog.text


def test_training_warns_of_untrained_positions_only_where_a_crop_cut_10_s_items(tmp_path, caplog):
    # every demo expert's log warned that 10 s would run past its 1 s crops of 2 s items, though the demo
    # generates 1 s; appendix B's 6 s crops of 10 s items are a choice the user is told about
    for i, (crop, longest, level) in enumerate(((12, 500, "WARNING"), (12, 100, "INFO"), (None, 12, "INFO"))):
        data = synthetic_data(frames=12, ragged=False)
        data.train.max_frames, data.train.crop, data.train.longest = 12, crop, longest
        caplog.clear()
        with caplog.at_level("INFO", logger="siren.train"):
            train(tiny_config(tmp_path / f"run{i}", "train.steps=1"), data, handle_signals=False)
        said = [r for r in caplog.records if "would run past the trained positions" in r.getMessage()]
        assert [r.levelname for r in said] == [level] and "at most 12 frames" in said[0].getMessage()


def test_a_full_disk_is_one_error_line_naming_the_file(tmp_path, monkeypatch, capsys):
    # safetensors, torch and libsndfile raise their own errors on a full disk (SafetensorError, RuntimeError
    # "unexpected pos", LibsndfileError(2, '')), and Python's own writes an OSError without the file's name:
    # each ended in a traceback, or in "error: No space left on device" naming nothing. Measured on a 64 KB
    # tmpfs on 2026-12-06; here the space left is what os.statvfs reports.
    import types

    from siren import cli

    def torch_like_writer(argv):
        with io.atomic_path(tmp_path / "run" / "model.pt") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(io.os, "statvfs", lambda p: types.SimpleNamespace(f_bavail=0, f_frsize=4096))
    assert cli.call(torch_like_writer, []) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: No space left on device writing {tmp_path / 'run' / 'model.pt'}; free space")
    assert "Traceback" not in err and not list((tmp_path / "run").iterdir())  # the partial file is gone
    # the command's own folder key: siren.train has run_dir=, no out= (the fix named a key it refuses)
    from siren.train_config import Stage1Config

    assert cli.call(torch_like_writer, [], Stage1Config) == 2 and "(run_dir=...)" in capsys.readouterr().err
    monkeypatch.setattr(io.os, "statvfs", lambda p: types.SimpleNamespace(f_bavail=1 << 20, f_frsize=4096))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with room left, another cause: passed on as it is
        torch_like_writer([])


def test_a_checkpoint_open_tensor_by_tensor_outlives_its_deletion_and_names_a_write_in_place(tmp_path, monkeypatch):
    """Task vectors keep every expert's checkpoint open while they compute; a training run pruning its checkpoints
    meanwhile deleted one, and the reader ended in a bare FileNotFoundError after its work (its version check
    took the path's stat, and a deletion moves a file's ctime). The file read is the one hashed and mapped: a
    deleted one is read to the end as it was, one written in place is named, one renamed in before the map too."""
    import safetensors

    path, other = tmp_path / "model.safetensors", tmp_path / "other.safetensors"
    want = {"a": torch.arange(6.0), "b": torch.ones(2, 3)}
    io.save_tensors(path, want)
    digest = io.sha256_file(path)
    with ckpt.open_tensors(path, digest) as f:
        path.unlink()
        assert all(torch.equal(f.get_tensor(k), v) for k, v in want.items())
    io.save_tensors(path, want)
    with pytest.raises(CheckpointError, match=r"model\.safetensors changed while it was read"):
        with ckpt.open_tensors(path, digest) as f:
            f.get_tensor("a")
            with open(path, "ab") as w:  # another process writing it
                w.write(b"\0")
    io.save_tensors(path, want)
    io.save_tensors(other, {k: torch.zeros_like(v) for k, v in want.items()})
    real = safetensors.safe_open

    def renamed_in_then_mapped(p, *args):  # another checkpoint renamed into place between the hash and the map
        os.replace(other, path)
        return real(p, *args)

    monkeypatch.setattr(safetensors, "safe_open", renamed_in_then_mapped)
    with pytest.raises(CheckpointError, match=r"model\.safetensors was replaced while it was read"):
        with ckpt.open_tensors(path, digest):
            pass
