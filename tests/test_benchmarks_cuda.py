"""benchmarks.cuda on the CPU at tiny sizes: the script the lead runs once on a lent GPU must not fail there
for a reason a CPU run would have shown (a renamed helper of benchmarks.train, a sampler signature, the JSON)."""
from __future__ import annotations

import json

import benchmarks.cuda as bench
from siren.codec import FRAME_RATE
from tests.helpers import FROZEN_DAC_TABLES, closed_form_params, overridden

TINY = ["device=cpu", "scale=tiny", "train_batch=2", "train_s=0.2", "train_steps=1",
        "gen_batch=2", "gen_s=0.1", "text_tokens=4"]


def test_tiny_cpu_train_row(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main([*TINY, "sections=train", f"out={out}"]) == 0
    r = json.loads(out.read_text())
    assert r["train"]["frames_per_step"] == 2 * round(0.2 * FRAME_RATE)
    cfg = bench.scale_config("tiny", "6-2")  # one expert, frozen DAC tables counted (as the official code)
    assert r["train"]["params"] == closed_form_params(cfg) // cfg.n_experts
    assert r["train"]["step_s"] > 0 and r["train"]["mfu"] is None  # no peak FLOP/s on the CPU
    # the model FLOPs are counted over a step (forward and backward), not 6 x params: at tiny the embedding tables
    # (applied once per step) are most of the parameters, so the 6ND rule overstated the FLOPs 3x
    assert 0 < r["train"]["flops_per_step"] < 6 * r["train"]["params"] * r["train"]["frames_per_step"]
    assert r["train"]["code_tokens_per_s"] == 2 * r["train"]["frames_per_s"]  # a 6-2 expert predicts 2 codes
    assert r["environment"]["torch"] and r["environment"]["code_version"]


def test_a_failing_section_does_not_lose_the_next(tmp_path, monkeypatch):
    """Also the CPU run of the generate section: sampling and DAC decoding of one frame."""
    def broken(cfg, device):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(bench, "bench_train", broken)
    out = tmp_path / "bench.json"
    assert bench.main(overridden(TINY, ["sections=train,generate", "gen_s=0.02", f"out={out}"])) == 1
    r = json.loads(out.read_text())
    assert "out of memory" in r["train"]["error"]
    gen = r["generate"]
    assert "error" not in gen and gen["frames"] == 1 and gen["decode_s"] > 0 and gen["sample_s"] > 0
    cfg = bench.scale_config("tiny", "6-2")  # every expert's parameters; the frozen DAC tables are buffers
    assert gen["params"] == closed_form_params(cfg) - cfg.n_experts * FROZEN_DAC_TABLES


def test_the_eval_section_times_all_three_metric_networks_and_the_clap_text(tmp_path):
    # VGGish (FAD) and the CLAP text tower were not timed; each network gets its own prepared inputs
    out = tmp_path / "bench.json"
    assert bench.main([*TINY, "sections=eval", "eval_clips=2", "eval_batch=2", "eval_clip_s=1", "eval_repeats=1",
                       f"out={out}"]) == 0
    r = json.loads(out.read_text())["eval"]
    assert set(r) == {"panns_cnn14", "vggish", "clap_audio", "clap_text"}
    assert all("error" not in v for v in r.values()) and r["vggish"]["clips_per_s"] > 0


def test_a_bad_value_is_one_error_before_any_section(capsys, tmp_path):
    # scale=nope was a traceback inside the train section (exit 1), eval_weights=bogus a header and "skipped" rows,
    # out=FOLDER an IsADirectoryError after the first section's compute
    import pytest

    from siren.errors import ConfigError

    (tmp_path / "file").write_text("")
    for bad, words in (("scale=nope", "nope"), ("eval_weights=bogus", "eval_weights must be random, demo"),
                       (f"out={tmp_path}", "is a folder; give the path of the JSON file"),
                       (f"out={tmp_path / 'file' / 'b.json'}", r"out=.*file/b.json: .*file is a file, not a folder; "
                                                                 r"give out=FOLDER/FILE.json$")):
        with pytest.raises(ConfigError, match=words):
            bench.main(overridden(TINY, [bad]))
    assert "benchmarks.cuda" not in capsys.readouterr().out
