"""Parameter table of a model config, counted on the meta device (no weights allocated).

    python -m siren.model.params scale=isolated-1.6b
    python -m siren.model.params scale=isolated-1.6b distribution=2-6 main_layers=47
    python -m siren.model.params scale=isolated-1.6b arch=legacy
    python -m siren.model.params family=continuous scale=cont-base     (paper/003, 193M)

Counted the official way (wjc2830/Siren holds the frozen DAC tables as parameters): an expert's
total includes its frozen code tables, 12 x (8,192 codebook + 9,216 out-projection) = 208,896,
which here are buffers. Columns: embed (the 12 trainable code projectors), frozen (those tables),
main (backbone blocks), decoder (residual-decoder blocks), heads, other (start tokens, the text
summary P(c), learned positions, final norms). Table 2's columns are block and projector
counts; ``table2_rows`` says which of ours each one is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from siren.cli import run as cli_run
from siren.config import load_config
from siren.errors import ConfigError
from siren.model.collaborative import CollaborativeModel
from siren.model.config import FAMILIES, PAPER_SIZES, ModelConfig, presets
from siren.model.expert import Expert

# Table 2 as printed: (# para., Embed., Main Para., Decoder Para., Head Para.); heads are the whole
# model's 12, every other column is one expert's except "# para." (the model's total).
TABLE2: dict[str, tuple[float, float, float, float, float]] = {
    "isolated-1.6b": (1632e6, 12.5e6, 231e6, 25e6, 12.6e6),
    "isolated-3.1b": (3084e6, 12.5e6, 396e6, 103e6, 12.6e6),
}


@dataclass
class ExpertParams:
    embedding: int  # trainable code projectors W_j, b_j
    frozen: int  # the codec's code tables (buffers here, parameters in the official code)
    main: int  # backbone blocks
    decoder: int  # residual-decoder blocks
    heads: int  # classifier heads C_j
    other: int  # backbone sos, decoder start (sos or text summary), learned positions, final norms

    @property
    def total(self) -> int:
        """The official count: every tensor of the expert, frozen tables included."""
        return self.embedding + self.frozen + self.main + self.decoder + self.heads + self.other

    @property
    def trainable(self) -> int:
        return self.total - self.frozen


def count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def expert_params(expert: Expert) -> ExpertParams:
    embed = count(expert.embedding)
    frozen = sum(b.numel() for b in expert.embedding.buffers())
    main, decoder = count(expert.backbone.blocks), count(expert.decoder.blocks if expert.decoder else None)
    heads = count(expert.heads)
    return ExpertParams(embed, frozen, main, decoder, heads, count(expert) - embed - main - decoder - heads)


def model_params(cfg: ModelConfig) -> list[ExpertParams]:
    """Per-expert counts, built on the meta device."""
    with torch.device("meta"):
        model = CollaborativeModel(cfg)
    return [expert_params(e) for e in model.experts]


def unmodified_preset(cfg: ModelConfig, args: list[str]) -> str | None:
    """The last ``scale=`` preset named in ``args`` if ``cfg`` still is exactly that preset."""
    names = [a.split("=", 1)[1] for a in args if a.startswith("scale=")]
    if not names:
        return None
    return names[-1] if load_config(ModelConfig, [f"scale={names[-1]}"], presets()) == cfg else None


def table2_rows(cfg: ModelConfig, rows: list[ExpertParams], name: str) -> list[str]:
    """Table 2's columns next to the counts they correspond to."""
    total, embed, main, decoder, heads = TABLE2[name]
    p, n_heads = rows[0], sum(len(cfg.expert_layers(k)) for k in range(cfg.n_experts))
    ours = [("# para.", total, sum(r.total for r in rows), f"{cfg.n_experts} experts, everything"),
            ("Embed.", embed, p.embedding, "one expert's 12 code projectors (Linear(1024, d))"),
            ("Main Para.", main, p.main, f"one expert's {cfg.main_layers} backbone blocks"),
            ("Decoder Para.", decoder, p.decoder, f"one expert's {cfg.decoder_layers} decoder blocks"),
            ("Head Para.", heads, sum(r.heads for r in rows), f"the model's {n_heads} heads")]
    lines = [f"{'Table 2 column':<15}{'paper':>10}{'ours':>16}{'':>9}  counted as"]
    for col, paper, n, what in ours:
        lines.append(f"{col:<15}{paper / 1e6:>9.1f}M{n:>16,}{(n - paper) / paper:>+9.2%}  {what}")
    lines.append(f"{'not in Table 2':<15}{'':>10}{p.frozen + p.other:>16,}{'':>9}  per expert: frozen code tables "
                 f"{p.frozen:,}, start tokens / text summary / norms / positions {p.other:,}")
    return lines


def table(cfg: ModelConfig, args: list[str] = ()) -> str:
    rows = model_params(cfg)
    lines = [f"distribution={cfg.distribution} conditioning={cfg.conditioning} dim={cfg.dim} "
             f"main_layers={cfg.main_layers} decoder_layers={cfg.decoder_layers} attn_heads={cfg.attn_heads} "
             f"mlp={cfg.mlp}({cfg.mlp_hidden_size}) decoder_start={cfg.decoder_start} block_order={cfg.block_order}",
             f"{'expert':<8}{'layers':<8}" + "".join(f"{c:>15}" for c in ("embed", "frozen", "main", "decoder",
                                                                            "heads", "other", "total"))]
    for k, p in enumerate(rows):
        layers = cfg.expert_layers(k)
        lines.append(f"{k:<8}{f'{layers.start}-{layers.stop - 1}':<8}" + "".join(
            f"{n:>15,}" for n in (p.embedding, p.frozen, p.main, p.decoder, p.heads, p.other, p.total)))
    total = sum(p.total for p in rows)
    lines.append(f"model total: {total:,} ({total / 1e6:,.1f}M; trainable {sum(p.trainable for p in rows):,})")
    name = unmodified_preset(cfg, list(args))
    if name in TABLE2:
        lines += table2_rows(cfg, rows, name)
    if name in PAPER_SIZES:
        size, kind, where = PAPER_SIZES[name]
        ours = total if kind == "total" else max(p.total for p in rows)
        lines.append(f"paper ({where}): {size / 1e6:,.1f}M {kind}; ours {ours / 1e6:,.1f}M; relative difference "
                     f"{(ours - size) / size:+.2%}")
    elif any(a.startswith("scale=") for a in args):
        lines.append("no paper size for this config (not a paper preset, or overridden)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from siren import cli

    args = cli.start(argv)
    families = [a.split("=", 1)[1] for a in args if a.startswith("family=")]
    for f in families:
        if f not in FAMILIES:
            raise ConfigError(f"family={f}: discrete (Siren, the default) or continuous (paper/003)")
    if len(set(families)) > 1:  # the last one was taken without a word; every other key refuses this
        raise ConfigError(f"'family' given twice, as {families[0]!r} and as {families[-1]!r}: give it once")
    args = [a for a in args if not a.startswith("family=")]
    scale = next((a.split("=", 1)[1] for a in reversed(args) if a.startswith("scale=")), "")
    if scale.startswith("cont-") and families[-1:] != ["continuous"]:
        raise ConfigError(f"scale={scale} is a preset of the continuous family (paper/003): add family=continuous")
    if families and families[-1] == "continuous":  # paper/003's continuous-token LM: its own config and table
        from siren.model.continuous.params import main as continuous_main

        return continuous_main(args) or 0
    print(table(load_config(ModelConfig, args, presets()), args))
    return 0


if __name__ == "__main__":
    cli_run(main, ModelConfig, __doc__, presets=presets())
