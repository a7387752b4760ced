"""The model family: configs, code embeddings, causality, conditioning inputs, incremental == full, params."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from siren.codec import CodeTables
from siren.config import ConfigError, load_config
from siren.model import CONDITIONINGS, DISTRIBUTIONS, CollaborativeModel, Expert, ModelConfig, params, presets
from siren.model.config import ARCHS, PAPER_SIZES, from_saved
from siren.model.embedding import CodeEmbedding
from tests.fixtures_model import code_batch, codec, synthetic_tables, text_batch, tiny, tiny_model  # noqa: F401
from tests.helpers import closed_form_params


def test_distribution_must_be_one_of_the_six():
    with pytest.raises(ConfigError, match="1-12, 2-6, 3-4, 4-3, 6-2, 12-1"):
        load_config(ModelConfig, ["distribution=5-3"], presets())
    with pytest.raises(ConfigError, match="accumulated, residual, none"):
        ModelConfig(conditioning="folded")
    with pytest.raises(ConfigError, match="unknown scale"):
        load_config(ModelConfig, ["scale=huge"], presets())
    with pytest.raises(ConfigError, match="swiglu, gelu"):
        ModelConfig(mlp="relu")
    with pytest.raises(ConfigError, match="dropout"):
        ModelConfig(dropout=1.0)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_experts_partition_the_twelve_layers_in_order(dist):
    cfg = ModelConfig(distribution=dist)
    K, m = map(int, dist.split("-"))
    assert (cfg.n_experts, cfg.layers_per_expert) == (K, m)
    assert [j for k in range(K) for j in cfg.expert_layers(k)] == list(range(12))
    assert list(cfg.expert_layers(K - 1)) == list(range(12 - m, 12))


def test_code_embedding_is_linear_projector_of_the_dac_latent():
    """e_j(q) = W_j f-hat^j + b_j with f-hat^j from the real (random-weight) DAC's own layer_features."""
    dac = codec()
    torch.manual_seed(0)
    emb = CodeEmbedding(16, dac.code_tables())
    torch.nn.init.normal_(emb.weight, 0.0, 0.02)  # as the expert initialises it
    codes = code_batch(B=2, T=3)
    _, f = dac.layer_features(codes)  # [B, 12, T, 1024], computed by DAC's quantizer modules
    want = torch.einsum("bjtl,jdl->btjd", f, emb.weight) + emb.bias  # [B, T, 12, d]
    got = emb(codes.transpose(1, 2))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_code_embedding_unfused_formula_with_bias():
    tables = synthetic_tables()
    torch.manual_seed(0)
    emb = CodeEmbedding(8, tables)
    with torch.no_grad():
        emb.bias.normal_()
    codes = torch.tensor([[3, 1000, 7, 0, 1, 2, 3, 4, 5, 6, 1023, 9]])
    got = emb(codes)[0]
    for j in range(12):
        latent = tables.out_weight[j] @ tables.codebooks[j, codes[0, j]] + tables.out_bias[j]  # DAC out-proj
        torch.testing.assert_close(got[j], emb.weight[j] @ latent + emb.bias[j], atol=1e-5, rtol=1e-5)
    sub = emb(codes[:, 4:7], layers=range(4, 7))[0]
    torch.testing.assert_close(sub, got[4:7])


def test_experts_share_nothing_and_frozen_tables_are_buffers():
    model = tiny_model()
    ids = [{id(p) for p in e.parameters()} for e in model.experts]
    assert all(not (a & b) for i, a in enumerate(ids) for b in ids[i + 1:])
    names = {n for n, _ in model.experts[0].named_buffers()}
    assert names == {"embedding.codebooks", "embedding.out_weight", "embedding.out_bias"}
    assert set(model.experts[0].state_dict()) >= names  # a checkpoint carries the tables


@pytest.mark.parametrize("cond", CONDITIONINGS)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_every_distribution_and_conditioning_trains(dist, cond):
    model = tiny_model(f"distribution={dist}", f"conditioning={cond}").train()
    codes, (text, mask) = code_batch(T=4), text_batch()
    logits = model(codes, text, mask)
    assert logits.shape == (2, 12, 4, 1024)
    batch = dict(codes=codes, frame_mask=torch.ones(2, 4, dtype=torch.bool), text=text, text_mask=mask)
    losses = model.loss(batch)
    assert [l.layers for l in losses] == [tuple(model.cfg.expert_layers(k)) for k in range(model.cfg.n_experts)]
    losses[-1].loss.backward()
    e = model.experts[-1]
    assert torch.isfinite(losses[-1].loss) and e.embedding.weight.grad.abs().sum() > 0
    assert e.backbone.blocks[0].cross_attn.kv.weight.grad.abs().sum() > 0
    assert (e.decoder is None) == (cond == "none")


def test_loss_is_eq6_over_valid_frames():
    model = tiny_model("distribution=4-3")
    codes, (text, mask) = code_batch(B=3, T=5), text_batch(B=3)
    frame_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    expert = model.experts[1]
    out = expert.loss(dict(codes=codes, frame_mask=frame_mask, text=text, text_mask=mask))
    logits = expert(codes, text, mask)
    ce, acc = [], []
    for i, j in enumerate(expert.layers):  # plain loops over valid frames
        terms = [(-F.log_softmax(logits[b, i, t], -1)[codes[b, j, t]], logits[b, i, t].argmax() == codes[b, j, t])
                 for b in range(3) for t in range(5) if frame_mask[b, t]]
        ce.append(sum(x for x, _ in terms) / len(terms))
        acc.append(sum(float(y) for _, y in terms) / len(terms))
    torch.testing.assert_close(out.ce, torch.stack(ce).detach())
    torch.testing.assert_close(out.loss, sum(ce) / 3)  # official code: mean over the owned layers
    batch = dict(codes=codes, frame_mask=frame_mask, text=text, text_mask=mask)
    torch.testing.assert_close(expert.loss(batch, reduction="sum").loss, sum(ce))  # Eq. 6 as written
    torch.testing.assert_close(out.acc, torch.tensor(acc))
    assert out.layers == (3, 4, 5) and out.frames == 9
    with pytest.raises(ValueError, match="mean, sum"):
        expert.loss(batch, reduction="max")
    # train.loss_layers: the first n owned layers in the loss, every layer's CE still reported
    torch.testing.assert_close(expert.loss(batch, n_layers=2).loss, (ce[0] + ce[1]) / 2)
    torch.testing.assert_close(expert.loss(batch, reduction="sum", n_layers=1).loss, ce[0])
    torch.testing.assert_close(expert.loss(batch, n_layers=1).ce, out.ce)
    with pytest.raises(ValueError, match=r"0\.\.3"):
        expert.loss(batch, n_layers=4)


def test_loss_layers_leave_the_other_heads_without_gradient():
    expert = tiny_model("distribution=4-3").experts[0]
    codes, (text, mask) = code_batch(B=2, T=6), text_batch(B=2)
    batch = dict(codes=codes, frame_mask=torch.ones(2, 6, dtype=torch.bool), text=text, text_mask=mask)
    expert.loss(batch, n_layers=1).loss.backward()
    assert expert.heads[0].weight.grad.abs().sum() > 0
    assert all(h.weight.grad is not None and not h.weight.grad.any() for h in expert.heads[1:])
    assert expert.backbone.blocks[0].self_attn.qkv.weight.grad.abs().sum() > 0  # the shared backbone still learns


def test_bad_inputs_name_the_problem():
    model = tiny_model()
    codes, (text, mask) = code_batch(), text_batch()
    with pytest.raises(ValueError, match="no real token for batch rows \\[1\\]"):
        model(codes, text, torch.stack([mask[0], torch.zeros_like(mask[1])]))
    with pytest.raises(ValueError, match="codes outside"):
        model(codes + 1024, text, mask)
    with pytest.raises(ValueError, match="text must be \\[B, L, 768\\]"):
        model(codes, text[..., :512], mask)
    with pytest.raises(ValueError, match="codes must be"):
        model(codes[:, :11], text, mask)
    with pytest.raises(ValueError, match="no valid frame"):
        model.experts[0].loss(dict(codes=codes, frame_mask=torch.zeros(2, 6, dtype=torch.bool), text=text,
                                   text_mask=mask))


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("cond", CONDITIONINGS)
def test_causal_in_time(cond, arch):
    """Changing the codes of step t never changes any layer's logits before t."""
    model = tiny_model("distribution=4-3", f"conditioning={cond}", f"arch={arch}")
    codes, (text, mask) = code_batch(T=7), text_batch()
    base = model(codes, text, mask)
    for t in (0, 3, 6):
        other = codes.clone()
        other[:, :, t] = (other[:, :, t] + 17) % 1024
        new = model(other, text, mask)
        assert torch.equal(new[:, :, :t], base[:, :, :t])
        if t < 6:  # the next step reads it (non-vacuous)
            assert (new[:, :, t + 1] - base[:, :, t + 1]).abs().max() > 1e-4


def expected_dependents(cfg: ModelConfig, i: int) -> set[int]:
    """Layers of the same step whose logits read layer i's code, by DESIGN "One model, two axes"."""
    owner = lambda j: j // cfg.layers_per_expert  # noqa: E731
    if cfg.conditioning == "accumulated":  # cond_j sums every layer < j; later positions of R_k attend to it
        return set(range(i + 1, 12))
    if cfg.conditioning == "residual":  # only cond_{i+1} reads e_i; later positions of that R_k attend to it
        return {j for j in range(i + 1, 12) if owner(j) == owner(i + 1)}
    return set()  # parallel heads: nothing of the same step


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("cond", CONDITIONINGS)
@pytest.mark.parametrize("dist", ["6-2", "4-3", "1-12", "12-1"])
def test_within_step_inputs_match_the_conditioning(dist, cond, arch):
    model = tiny_model(f"distribution={dist}", f"conditioning={cond}", f"arch={arch}")
    codes, (text, mask) = code_batch(T=3), text_batch()
    base = model(codes, text, mask)
    t = 1
    for i in range(12):
        other = codes.clone()
        other[:, i, t] = (other[:, i, t] + 401) % 1024
        diff = (model(other, text, mask)[:, :, t] - base[:, :, t]).abs().amax((0, 2))  # [12]
        changed = {j for j in range(12) if diff[j] > 1e-4}
        unchanged = {j for j in range(12) if diff[j] == 0}
        want = expected_dependents(model.cfg, i)
        assert changed == want, (i, changed, want)
        assert unchanged == set(range(12)) - want, (i, diff)
        assert all(j > i for j in changed)  # layer j never reads layers >= j


def incremental_logits(model: CollaborativeModel, codes, text, mask, cached: bool) -> torch.Tensor:
    """Drive the sampling API with given codes; layers >= j of the current step are garbage when j is asked."""
    B, _, T = codes.shape
    out = torch.empty(B, 12, T, 1024)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for expert in model.experts:
            state = expert.start(text, mask, cached=cached)
            for t in range(T):
                future = codes.clone()
                future[:, :, t:] = torch.randint(0, 1024, future[:, :, t:].shape, generator=g)
                h = expert.backbone_step(state, torch.cat([codes[:, :, :t], future[:, :, t:]], 2))
                for i, j in enumerate(expert.layers):
                    codes_t = torch.cat([codes[:, :j, t], future[:, j:, t]], 1)
                    out[:, j, t] = expert.layer_logits(state, h, codes_t, i)
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("cond", CONDITIONINGS)
@pytest.mark.parametrize("dist", ["6-2", "3-4", "1-12"])
def test_kv_cached_incremental_equals_teacher_forced(dist, cond, arch):
    model = tiny_model(f"distribution={dist}", f"conditioning={cond}", f"arch={arch}")
    codes, (text, mask) = code_batch(T=9), text_batch()
    with torch.no_grad():
        full = model(codes, text, mask)
    for cached in (True, False):
        torch.testing.assert_close(incremental_logits(model, codes, text, mask, cached), full, atol=1e-5, rtol=0)


def test_self_attention_cache_in_chunks_equals_full_sequence():
    from siren.model.blocks import KVCache, SelfAttention
    torch.manual_seed(0)
    attn = SelfAttention(32, 4)
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        full = attn(x)
        cache = KVCache()
        parts = [attn(x[:, a:b], cache) for a, b in ((0, 3), (3, 4), (4, 9), (9, 11))]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-6, rtol=0)
    assert cache.length == 11


@pytest.mark.parametrize("overrides", [("distribution=6-2",), ("distribution=1-12", "conditioning=none"),
                                       ("distribution=3-4", "conditioning=residual", "decoder_layers=2"),
                                       ("arch=legacy",), ("arch=legacy", "distribution=1-12", "conditioning=none"),
                                       ("mlp=gelu", "mlp_hidden=96", "decoder_start=learned", "head_bias=true")])
def test_meta_count_equals_real_count_and_closed_form(overrides):
    cfg = tiny(*overrides)
    model = CollaborativeModel(cfg, synthetic_tables())
    real = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    meta = sum(p.total for p in params.model_params(cfg))
    assert meta == real == closed_form_params(cfg)


@pytest.mark.parametrize("name, per_expert", [("isolated-1.6b", 272_697_344), ("isolated-3.1b", 515_002_368)])
def test_isolated_presets_count_as_the_official_code(name, per_expert, capsys):
    """Parity target measured from the authors' code (wjc2830/Siren, configs/siren_1_6b.json and
    siren_3_1b.json): the sum of numel over one SirenExpert's parameters, frozen DAC tables included."""
    params.main([f"scale={name}"])  # the command of the "done when"
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line[:1].isdigit()]
    assert [row[-1] for row in rows] == [f"{per_expert:,}"] * 6  # the "total" column of every expert


@pytest.mark.parametrize("name", sorted(PAPER_SIZES))
def test_paper_presets_within_3_percent(name):
    cfg = load_config(ModelConfig, [f"scale={name}"], presets())
    size, kind, _ = PAPER_SIZES[name]
    rows = params.model_params(cfg)
    ours = sum(p.total for p in rows) if kind == "total" else rows[0].total
    assert ours == closed_form_params(cfg) // (1 if kind == "total" else cfg.n_experts)
    assert abs(ours - size) / size < 0.03, (name, ours, size)


@pytest.mark.parametrize("scale,dropout", [("tiny", 0.0), ("small", 0.0), ("isolated-1.6b", 0.1)])
def test_arch_official_keeps_the_sizes_dropout(scale, dropout):
    """The authors keep dropout in each size's config (tiny.json 0.0, siren_1_6b.json 0.1): `arch=official` given
    before or after `scale=` leaves it; `arch=legacy` (this harness's first reading) has none."""
    for args in ([f"scale={scale}", "arch=official"], ["arch=official", f"scale={scale}"]):
        assert load_config(ModelConfig, args, presets()).dropout == dropout, args
    assert load_config(ModelConfig, [f"scale={scale}", "arch=legacy"], presets()).dropout == 0.0


def test_isolated_presets_match_table2_rows():
    """Table 2 columns: per-expert embedding 12.5M, main 231M / 396M, decoder 25M / 103M, heads 12.6M in all."""
    for name, main, dec in (("isolated-1.6b", 231e6, 25e6), ("isolated-3.1b", 396e6, 103e6)):
        rows = params.model_params(load_config(ModelConfig, [f"scale={name}"], presets()))
        assert len(rows) == 6
        for p in rows:
            assert abs(p.embedding - 12.5e6) / 12.5e6 < 0.03
            assert abs(p.main - main) / main < 0.03 and abs(p.decoder - dec) / dec < 0.03
        assert abs(sum(p.heads for p in rows) - 12.6e6) / 12.6e6 < 0.01


def test_params_command_refuses_two_families_and_names_the_continuous_one():
    # family= twice took the last in silence; scale=cont-base alone said "unknown scale" with no hint
    with pytest.raises(ConfigError, match="'family' given twice, as 'discrete' and as 'continuous'"):
        params.main(["family=discrete", "family=continuous", "scale=cont-base"])
    with pytest.raises(ConfigError, match="scale=cont-base is a preset of the continuous family .*family=continuous"):
        params.main(["scale=cont-base"])


def test_params_table_keeps_ten_digit_counts_apart(capsys):
    """At dim 2048 a count has 13 characters with its commas: the 13-wide columns ran them together."""
    params.main(["scale=single-3.3b"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line[:1].isdigit()).split()
    (p,) = params.model_params(load_config(ModelConfig, ["scale=single-3.3b"], presets()))
    assert row[2:] == [f"{n:,}" for n in (p.embedding, p.frozen, p.main, p.decoder, p.heads, p.other, p.total)]
    assert p.total >= 10**9


def test_params_command_prints_table(capsys):
    params.main(["scale=isolated-1.6b"])
    out = capsys.readouterr().out
    assert "paper (Table 2): 1,632.0M total" in out and "relative difference" in out
    assert len([l for l in out.splitlines() if l[:1].isdigit()]) == 6
    d = 1024  # Table 2's columns are block / projector / head counts: each printed next to ours
    block = 3 * d + 4 * d * d + (2 * d * d + 2 * 768 * d + 4 * d) + 3 * 2816 * d
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    assert f"{14 * block:,}" in lines["Main Para."] and f"{12 * (1024 * d + d):,}" in lines["Embed."]
    assert f"{2 * (block - d - (2 * d * d + 2 * 768 * d + 4 * d)):,}" in lines["Decoder Para."]
    assert f"{12 * 1024 * d:,}" in lines["Head Para."]
    params.main(["scale=isolated-1.6b", "distribution=2-6"])
    assert "no paper size" in capsys.readouterr().out


def test_checkpoint_roundtrip_without_tables():
    """An expert built with tables=None takes everything (tables included) from a state dict."""
    src = tiny_model().experts[2]
    dst = Expert(src.cfg, 2)
    dst.load_state_dict(src.state_dict())
    codes, (text, mask) = code_batch(), text_batch()
    torch.testing.assert_close(dst(codes, text, mask), src(codes, text, mask), atol=0, rtol=0)


def test_from_codec_records_codec_id():
    model = CollaborativeModel.from_codec(tiny(), codec())
    assert model.cfg.codec == codec().id
    torch.testing.assert_close(model.experts[0].embedding.codebooks, codec().code_tables().codebooks)
    assert isinstance(codec().code_tables(), CodeTables)


def test_dropout_only_in_training():
    model = tiny_model("dropout=0.5", seed=3)
    codes, (text, mask) = code_batch(T=4), text_batch()
    with torch.no_grad():
        a, b = model(codes, text, mask), model(codes, text, mask)
        assert torch.equal(a, b)  # eval(): deterministic
        model.train()
        c, d = model(codes, text, mask), model(codes, text, mask)
    assert not torch.equal(c, d) and not torch.equal(a, c)


@pytest.mark.parametrize("start", ["text", "learned"])
def test_decoder_start_reads_only_real_text_tokens(start):
    """decoder_start=text: P(c) is a map of the masked mean of the text states, so padded states never
    matter (cross-attention masks them too) but a real token's state moves every layer except via h_t."""
    model = tiny_model(f"decoder_start={start}", "conditioning=accumulated")
    codes, (text, mask) = code_batch(T=3), text_batch()
    with torch.no_grad():
        base = model(codes, text, mask)
        padded = text.clone()
        padded[~mask] = 100.0  # row 1's padded tokens
        torch.testing.assert_close(model(codes, padded, mask), base, atol=0, rtol=0)
        e = model.experts[0]
        h = e.backbone(torch.zeros(2, 3, e.cfg.dim), e.backbone.text_kv(text, mask))
        emb = e.embedding(codes[:, :1].transpose(1, 2), range(1))
        shifted = text + 1.0  # same cross-attention input for the backbone h, only P(c) differs
        moved = e.logits(h, emb, e.decoder.start(shifted, mask)) - e.logits(h, emb, e.decoder.start(text, mask))
    assert (moved.abs().amax() > 1e-4) == (start == "text")


def test_saved_configs_without_arch_keys_are_legacy():
    """run_dir/config.json written before the architecture keys: read as arch=legacy (mlp_ratio -> mlp_hidden)."""
    legacy = tiny("arch=legacy")
    saved = {k: v for k, v in dataclasses.asdict(legacy).items() if k not in ARCHS["legacy"]}
    cfg = from_saved({**saved, "mlp_ratio": 4}, "old config.json")
    assert cfg == dataclasses.replace(legacy, mlp_hidden=4 * legacy.dim)
    assert from_saved(dataclasses.asdict(tiny())) == tiny()  # a current config is taken as it is
    src = CollaborativeModel(legacy, synthetic_tables()).experts[1]
    Expert(cfg, 1).load_state_dict(src.state_dict())  # the old weights fit
