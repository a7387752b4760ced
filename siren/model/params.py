"""Parameter table of a model config, counted on the meta device (no weights allocated).

    python -m siren.model.params scale=isolated-1.6b
    python -m siren.model.params scale=isolated-1.6b distribution=2-6 main_layers=47
    python -m siren.model.params family=continuous scale=cont-base     (paper/003, 193M)

Columns follow Table 2: code embeddings (the 12 trainable projectors), main (backbone),
decoder (residual decoder), heads. Frozen codec tables (buffers) are not parameters.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from siren.config import ConfigError, load_config
from siren.model.collaborative import CollaborativeModel
from siren.model.config import PAPER_SIZES, ModelConfig, presets
from siren.model.expert import Expert


@dataclass
class ExpertParams:
    embedding: int
    main: int
    decoder: int
    heads: int

    @property
    def total(self) -> int:
        return self.embedding + self.main + self.decoder + self.heads


def count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def expert_params(expert: Expert) -> ExpertParams:
    return ExpertParams(count(expert.embedding), count(expert.backbone), count(expert.decoder), count(expert.heads))


def model_params(cfg: ModelConfig) -> list[ExpertParams]:
    """Per-expert counts, built on the meta device."""
    with torch.device("meta"):
        model = CollaborativeModel(cfg)
    return [expert_params(e) for e in model.experts]


def paper_reference(cfg: ModelConfig, args: list[str]) -> tuple[float, str, str] | None:
    """The paper's size for the named scale preset, if the config still is that preset."""
    names = [a.split("=", 1)[1] for a in args if a.startswith("scale=")]
    if not names or names[-1] not in PAPER_SIZES:
        return None
    preset = load_config(ModelConfig, [f"scale={names[-1]}"], presets())
    return PAPER_SIZES[names[-1]] if preset == cfg else None


def table(cfg: ModelConfig, args: list[str] = ()) -> str:
    rows = model_params(cfg)
    M = lambda n: f"{n / 1e6:,.1f}M"  # noqa: E731
    lines = [f"distribution={cfg.distribution} conditioning={cfg.conditioning} dim={cfg.dim} "
             f"main_layers={cfg.main_layers} decoder_layers={cfg.decoder_layers} attn_heads={cfg.attn_heads}",
             f"{'expert':<8}{'layers':<10}{'embed':>10}{'main':>10}{'decoder':>10}{'heads':>10}{'total':>11}"]
    for k, p in enumerate(rows):
        layers = cfg.expert_layers(k)
        lines.append(f"{k:<8}{f'{layers.start}-{layers.stop - 1}':<10}{M(p.embedding):>10}{M(p.main):>10}"
                     f"{M(p.decoder):>10}{M(p.heads):>10}{M(p.total):>11}")
    total = sum(p.total for p in rows)
    lines.append(f"model total: {total:,} ({M(total)})")
    ref = paper_reference(cfg, list(args))
    if ref is not None:
        size, kind, where = ref
        ours = total if kind == "total" else max(p.total for p in rows)
        lines.append(f"paper ({where}): {M(size)} {kind}; ours {M(ours)}; relative difference "
                     f"{(ours - size) / size:+.2%}")
    elif any(a.startswith("scale=") for a in args):
        lines.append("no paper size for this config (not a paper preset, or overridden)")
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    args = sys.argv[1:] if argv is None else argv
    if "family=continuous" in args:  # paper/003's continuous-token LM: its own config and table
        from siren.model.continuous.params import main as continuous_main
        return continuous_main([a for a in args if a != "family=continuous"])
    try:
        cfg = load_config(ModelConfig, args, presets())
    except ConfigError as e:
        sys.exit(f"error: {e}")
    print(table(cfg, args))


if __name__ == "__main__":
    main()
