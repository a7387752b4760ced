"""Parameter table of a continuous-LM config, counted on the meta device (no weights allocated).

    python -m siren.model.params family=continuous scale=cont-base
    python -m siren.model.continuous.params scale=cont-large

Columns: input projection + [MASK] (W_in, mask), backbone (blocks, sos, final norm), diffusion head.
The latent projection is a fitted buffer, not a parameter.
"""
from __future__ import annotations

import torch

from siren.config import load_config
from siren.model.continuous.config import PAPER_SIZES, ContinuousConfig, presets
from siren.model.continuous.model import ContinuousLM


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def counts(cfg: ContinuousConfig) -> dict[str, int]:
    with torch.device("meta"):
        model = ContinuousLM(cfg)
    mask = model.mask.numel() if model.mask is not None else 0
    return {"input": count(model.inp) + mask, "backbone": count(model.backbone),
            "head": count(model.head), "total": count(model)}


def table(cfg: ContinuousConfig, args: list[str] = ()) -> str:
    c = counts(cfg)
    M = lambda n: f"{n / 1e6:,.1f}M"  # noqa: E731
    lines = [f"family=continuous token_dim={cfg.token_dim} dim={cfg.dim} layers={cfg.layers} "
             f"attn_heads={cfg.attn_heads} head_width={cfg.head_width} head_depth={cfg.head_depth}",
             f"{'input':>10}{'backbone':>11}{'head':>10}{'total':>11}",
             f"{M(c['input']):>10}{M(c['backbone']):>11}{M(c['head']):>10}{M(c['total']):>11}",
             f"model total: {c['total']:,} ({M(c['total'])})"]
    names = [a.split("=", 1)[1] for a in args if a.startswith("scale=")]
    if names and names[-1] in PAPER_SIZES and load_config(ContinuousConfig, [f"scale={names[-1]}"], presets()) == cfg:
        size, where = PAPER_SIZES[names[-1]]
        lines.append(f"paper ({where}): {M(size)}; ours {M(c['total'])}; relative difference "
                     f"{(c['total'] - size) / size:+.2%}")
    elif names:
        lines.append("no paper size for this config (not a paper preset, or overridden)")
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    from siren import cli

    args = cli.start(argv)
    print(table(load_config(ContinuousConfig, args, presets()), args))


if __name__ == "__main__":
    from siren import cli

    cli.run(main, ContinuousConfig, __doc__)
