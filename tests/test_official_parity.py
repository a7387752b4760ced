"""Parity with the authors' code (wjc2830/Siren): the same weights give the same logits and loss, and the
cosine schedule the same learning rate at every step.

Needs a checkout of https://github.com/wjc2830/Siren; skipped unless ``SIREN_OFFICIAL_SRC`` names
it (its package is also called ``siren``, so it is imported under another name, never copied):

    SIREN_OFFICIAL_SRC=/path/to/Siren python -m pytest -q tests/test_official_parity.py
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from siren.config import load_config
from siren.model import Expert, ModelConfig, presets
from tests.fixtures_model import code_batch, synthetic_tables, text_batch

SRC = os.environ.get("SIREN_OFFICIAL_SRC", "")
pytestmark = pytest.mark.skipif(not SRC, reason="SIREN_OFFICIAL_SRC (a wjc2830/Siren checkout) is not set")


def official():
    """The authors' package, imported as ``siren_official``."""
    if "siren_official" not in sys.modules:
        root = Path(SRC) / "src" / "siren"
        spec = importlib.util.spec_from_file_location("siren_official", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        sys.modules["siren_official"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["siren_official"]


def our_state(off) -> dict[str, torch.Tensor]:
    """The authors' SirenExpert weights under our names (frozen DAC tables included)."""
    layers = off.codebooks.layers
    sd = {"embedding.codebooks": torch.stack([m.codebook.weight for m in layers]),
          "embedding.out_weight": torch.stack([m.dac_out.weight for m in layers]),
          "embedding.out_bias": torch.stack([m.dac_out.bias for m in layers]),
          "embedding.weight": torch.stack([m.projector.weight for m in layers]),
          "embedding.bias": torch.stack([m.projector.bias for m in layers]),
          "backbone.sos": off.sos.view(-1), "backbone.norm.weight": off.spatial_norm.weight,
          "decoder.text_start.weight": off.prompt_summary.weight, "decoder.text_start.bias": off.prompt_summary.bias,
          "decoder.norm.weight": off.factorized_norm.weight}
    sd.update({f"heads.{i}.weight": h.weight for i, h in enumerate(off.heads)})
    blocks = [(f"backbone.blocks.{i}", b, b.self_norm, b.self_attention) for i, b in enumerate(off.spatial_blocks)]
    blocks += [(f"decoder.blocks.{i}", b, b.attention_norm, b.attention) for i, b in enumerate(off.factorized_blocks)]
    for name, b, norm, attn in blocks:
        gate, value = b.feed_forward.gate_value.weight.chunk(2, 0)
        sd.update({f"{name}.norm_self.weight": norm.weight, f"{name}.self_attn.qkv.weight": attn.qkv.weight,
                   f"{name}.self_attn.out.weight": attn.output.weight, f"{name}.norm_mlp.weight": b.ffn_norm.weight,
                   f"{name}.mlp.gate.weight": gate, f"{name}.mlp.up.weight": value,
                   f"{name}.mlp.down.weight": b.feed_forward.down.weight})
        if hasattr(b, "cross_attention"):
            ca = b.cross_attention
            for ours, theirs in (("q", ca.query), ("kv", ca.key_value), ("out", ca.output)):
                sd[f"{name}.cross_attn.{ours}.weight"] = theirs.weight
                sd[f"{name}.cross_attn.{ours}.bias"] = theirs.bias
            sd[f"{name}.norm_cross.weight"] = b.cross_norm.weight
    return {k: v.detach().clone() for k, v in sd.items()}


@pytest.mark.parametrize("k", [0, 3, 5])
def test_official_expert_equals_ours(k):
    sirn = official()
    cfg = sirn.SirenConfig(dim=64, n_heads=4, n_kv_heads=4, spatial_layers=2, factorized_layers=1,
                           dac_feature_dim=1024, max_seq_len=64, max_prompt_len=16, ffn_multiple_of=256)
    torch.manual_seed(k)
    off = sirn.SirenExpert(cfg, 2 * k, allow_random_codebooks=True).eval()
    tables = synthetic_tables(k)
    with torch.no_grad():  # random vectors and 10x matrices: every bias, norm and position placement matters
        for n, p in off.named_parameters():
            if p.dim() == 1 or n == "sos":
                p.normal_(0, 0.3)
            else:
                p.mul_(10)
        for j, m in enumerate(off.codebooks.layers):
            m.codebook.weight.copy_(tables.codebooks[j])
            m.dac_out.weight.copy_(tables.out_weight[j])
            m.dac_out.bias.copy_(tables.out_bias[j])
    ours = Expert(load_config(ModelConfig, ["arch=official", "dim=64", "attn_heads=4", "main_layers=2",
                                            "decoder_layers=1"], presets()), k)
    ours.load_state_dict(our_state(off), strict=True)
    ours.eval()
    assert sum(p.numel() for p in off.parameters()) == \
        sum(p.numel() for p in ours.parameters()) + sum(b.numel() for b in ours.buffers())
    codes, (text, mask) = code_batch(T=9, seed=k), text_batch(seed=k)
    with torch.no_grad():
        want = torch.stack(off(codes, text, None, mask), 1)  # [B, 2, T, 1024]
        want_loss = sirn.Stage1Module(off).compute_loss(dict(codes=codes, prompt_embeddings=text,
                                                             prompt_mask=mask))["loss"]
        got = ours(codes, text, mask)
        got_loss = ours.loss(dict(codes=codes, frame_mask=torch.ones(2, 9, dtype=torch.bool), text=text,
                                  text_mask=mask)).loss
    assert want.abs().max() > 1.0  # logits far from zero: the comparison is not vacuous
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("steps, warmup", [(1000, 100), (300, 0), (50, 49), (10, 10), (300, 2000)])
def test_official_learning_rate_schedule_equals_ours(steps, warmup):
    """train.schedule=cosine against the authors' learning_rate_at, every step (ours ended on the floor one step
    after the last until 2026-12-06), with the warmup their train command passes it: min(warmup, steps) (a longer
    warmup here ramped to only steps/warmup of lr)."""
    from siren.runtime import lr_at
    from siren.train_config import TrainConfig

    sirn = official()
    cfg = TrainConfig(steps=steps, warmup_steps=warmup, lr=3e-4, min_lr=3e-5)
    for s in range(steps):
        want = sirn.training.learning_rate_at(s, base_learning_rate=3e-4, total_steps=steps,
                                              warmup_steps=min(warmup, steps), min_ratio=0.1)
        assert lr_at(s, cfg) == pytest.approx(want, rel=1e-12, abs=1e-15), s


def test_official_optimiser_defaults_equal_ours():
    """AdamW's lr, betas and weight decay: the authors' configure_optimizer defaults are TrainConfig's (the weight
    decay was 0.1 here until 2026-12-07; scale=demo keeps 0.1, with which its tables were made)."""
    import inspect

    from siren.train_config import TrainConfig

    want = {k: p.default for k, p in
            inspect.signature(official().training.Stage1Module.configure_optimizer).parameters.items() if k != "self"}
    cfg = TrainConfig()
    assert want == {"learning_rate": cfg.lr, "weight_decay": cfg.weight_decay, "betas": (cfg.beta1, cfg.beta2)}


@pytest.mark.parametrize("config, scale", [("siren_1_6b", "isolated-1.6b"), ("siren_3_1b", "isolated-3.1b")])
def test_official_paper_configs_count_as_our_presets(config, scale):
    """The authors' configs/siren_1_6b.json and siren_3_1b.json, built by their SirenExpert on the meta device,
    have as many parameters per expert as our presets (test_model pins the numbers; this is where they come
    from)."""
    import json

    from siren.model.params import model_params

    sirn = official()
    cfg = sirn.SirenConfig(**json.loads((Path(SRC) / "configs" / f"{config}.json").read_text()))
    with torch.device("meta"):
        theirs = sirn.SirenExpert(cfg, 0, allow_random_codebooks=True)
    ours = model_params(load_config(ModelConfig, [f"scale={scale}"], presets()))
    assert {e.total for e in ours} == {sum(p.numel() for p in theirs.parameters())}
