"""ModelConfig: the one model of every table, configured by two axes (DESIGN "One model, two axes").

- ``distribution`` "K-m": K experts, each predicting m adjacent RVQ layers, K*m = 12.
  Expert k (0-based) owns layers [k*m, (k+1)*m). "1-12" is a single transformer, "6-2" is Siren.
- ``conditioning``: how a code sees the other codes of its own time step:
  "accumulated" (context folding, Eq. 5), "residual" (previous layer only) or "none"
  (parallel heads on h_t, AudioGen / Table 5 "Indpdt").

Scale presets (``scale=NAME``) size the experts; Table 2 gives the isolated models, Table 3
the single baselines, Table 6 the other distributions at ~1.6B in total.

Architecture keys: the defaults are the authors' code (wjc2830/Siren, ``arch=official``), which
fixes what the paper text leaves open or states otherwise; ``arch=legacy`` is this harness's
first reading of the paper text (GELU 4d MLP, no dropout, a learned decoder ``sos`` as Eq. 5
writes, self- before cross-attention, positions added once). ``scale`` sets sizes only (tiny and
small also dropout 0, which ``arch=official`` keeps), ``arch`` the architecture; with both, the later one wins
where they overlap.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from siren.codec import CODEBOOK_SIZE, N_LAYERS
from siren.config import ConfigError

DISTRIBUTIONS = ("1-12", "2-6", "3-4", "4-3", "6-2", "12-1")
CONDITIONINGS = ("accumulated", "residual", "none")
FAMILIES = ("discrete", "continuous")  # Siren's RVQ experts | paper/003's continuous-token LM
# allowed values of the architecture keys (the first is the official code's)
CHOICES = {"mlp": ("swiglu", "gelu"), "decoder_start": ("text", "learned"),
           "block_order": ("cross_first", "self_first"), "positions": ("every_block", "once"),
           "decoder_positions": ("sinusoidal", "learned"), "init": ("normal", "scaled")}

log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    distribution: str = "6-2"  # "K-m": K experts x m RVQ layers each, K*m = 12
    conditioning: str = "accumulated"  # accumulated | residual | none
    dim: int = 1024  # d, width of backbone and residual decoder
    main_layers: int = 14  # backbone F_k blocks (self-attn + cross-attn to text + MLP)
    decoder_layers: int = 2  # residual decoder R_k blocks (self-attn + MLP)
    attn_heads: int = 16  # attention heads (Table 2's "Head Count 12" counts classifier heads)
    text_dim: int = 768  # CLAP text token states (keys/values of cross-attention)
    codec: str = ""  # id of the codec whose frozen code tables the embeddings hold
    # architecture (defaults: the official code; see the module docstring and arch=legacy)
    mlp: str = "swiglu"  # swiglu: down(silu(gate x) * up x) | gelu: down(gelu(up x))
    mlp_hidden: int = 0  # 0 = auto: swiglu int(8d/3) rounded up to a multiple of 256 (2816 at d=1024), gelu 4d
    dropout: float = 0.1  # attention probabilities and MLP output, training only (eval() turns it off)
    decoder_start: str = "text"  # R_k start: text = Linear(768, d) of the masked mean of the text states | learned
    block_order: str = "cross_first"  # backbone block: cross_first (cross, self, MLP) | self_first (self, cross, MLP)
    positions: str = "every_block"  # sin/cos (and learned) positions re-added before every block | once, at the input
    decoder_positions: str = "sinusoidal"  # R_k's m+1 slots: sinusoidal | learned
    head_bias: bool = False  # bias on the classifier heads C_j
    cross_attn_bias: bool = True  # biases on cross-attention q, k/v, out
    norm_eps: float = 1e-5  # RMSNorm epsilon; 0 = torch's default (the dtype's machine epsilon)
    init: str = "normal"  # normal: N(0, 0.02) for every matrix | scaled: GPT-2, residual outputs / sqrt(2 depth)

    def __post_init__(self):
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(f"distribution '{self.distribution}' is not allowed: K experts x m layers with "
                              f"K*m = {N_LAYERS}; allowed: {', '.join(DISTRIBUTIONS)}")
        if self.conditioning not in CONDITIONINGS:
            raise ConfigError(f"conditioning '{self.conditioning}' is not allowed; allowed: {', '.join(CONDITIONINGS)}")
        for key in ("dim", "main_layers", "attn_heads", "text_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} '{getattr(self, key)}' is not allowed; allowed: {', '.join(allowed)}")
        if self.mlp_hidden < 0:
            raise ConfigError(f"mlp_hidden must be >= 0 (0 = auto), got {self.mlp_hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps < 0:
            raise ConfigError(f"norm_eps must be >= 0 (0 = torch's default), got {self.norm_eps}")
        if self.decoder_layers < 0 or (self.decoder_layers == 0 and self.conditioning != "none"):
            raise ConfigError(f"decoder_layers must be >= 1 with conditioning={self.conditioning} "
                              f"(got {self.decoder_layers}); only conditioning=none has no residual decoder")
        if self.dim % self.attn_heads:
            raise ConfigError(f"dim={self.dim} is not divisible by attn_heads={self.attn_heads}")

    @property
    def n_experts(self) -> int:  # K
        return int(self.distribution.split("-")[0])

    @property
    def layers_per_expert(self) -> int:  # m
        return int(self.distribution.split("-")[1])

    def expert_layers(self, k: int) -> range:
        """RVQ layers owned by expert k (0-based): [k*m, (k+1)*m)."""
        if not 0 <= k < self.n_experts:
            raise IndexError(f"expert {k} does not exist in distribution {self.distribution}")
        m = self.layers_per_expert
        return range(k * m, (k + 1) * m)

    @property
    def vocab(self) -> int:
        return CODEBOOK_SIZE

    @property
    def mlp_hidden_size(self) -> int:
        """The MLP hidden width: ``mlp_hidden``, or the official rule for SwiGLU (LLaMA's 8d/3 rounded
        up to a multiple of 256: 2816 at d = 1024) and 4d for GELU."""
        if self.mlp_hidden:
            return self.mlp_hidden
        return -(-int(8 * self.dim / 3) // 256) * 256 if self.mlp == "swiglu" else 4 * self.dim


# Architecture presets (``arch=NAME``). official: the authors' code, also the field defaults.
# legacy: this harness before it read the official code; what configs saved without these keys mean.
# official leaves dropout to the size, as the authors' configs do (tiny.json 0.0, siren_1_6b.json 0.1):
# were it here, `scale=tiny arch=official` (the grids' order) would train the tiny experts with 0.1.
ARCHS: dict[str, dict[str, Any]] = {
    "official": dict(mlp="swiglu", mlp_hidden=0, decoder_start="text", block_order="cross_first",
                     positions="every_block", decoder_positions="sinusoidal", head_bias=False,
                     cross_attn_bias=True, norm_eps=1e-5, init="normal"),
    "legacy": dict(mlp="gelu", mlp_hidden=0, dropout=0.0, decoder_start="learned", block_order="self_first",
                   positions="once", decoder_positions="learned", head_bias=True, cross_attn_bias=False,
                   norm_eps=0.0, init="scaled"),
}


def from_saved(data: Mapping[str, Any], where: str = "config") -> ModelConfig:
    """A ModelConfig from a checkpoint's JSON. Configs saved before the architecture keys existed
    were built with the legacy architecture (and ``mlp_ratio``): their missing keys get those values."""
    from siren.config import from_dict

    data = dict(data)
    if not any(k in data for k in ARCHS["legacy"]):
        log.info("%s predates the architecture keys: reading it as arch=legacy", where)
        ratio = data.pop("mlp_ratio", 4)
        data = {**ARCHS["legacy"], **data, "mlp_hidden": ratio * data.get("dim", ModelConfig.dim)}
    return from_dict(ModelConfig, data, where)


_PAPER = dict(dim=1024, attn_heads=16)  # Table 2: d = 1024; 16 heads of 64 (the paper does not say)

# name -> {field: value}. Main-layer counts of the Table 3/6 presets are chosen so the totals
# (official architecture) match the paper's names (checked by tests, printed by `python -m siren.model.params`).
SCALES: dict[str, dict[str, Any]] = {
    # The official architecture at toy sizes, without dropout (as the authors' configs/tiny.json, which also has
    # 2 KV heads and an MLP rounded to x32: not here, where every head has its own K/V and the rounding is x256):
    # demo runs train for minutes on a few clips, and tests compare train-mode forwards.
    "tiny": dict(dim=64, main_layers=2, decoder_layers=1, attn_heads=4, dropout=0.0),  # CPU tests, demo
    "small": dict(dim=256, main_layers=4, decoder_layers=1, attn_heads=4, dropout=0.0),  # CPU benchmarks
    # Table 2 (Siren, 6-2): 14 main + 2 decoder layers (1,632M) and 24 + 8 (3,084M).
    "isolated-1.6b": dict(distribution="6-2", main_layers=14, decoder_layers=2, **_PAPER),
    "isolated-3.1b": dict(distribution="6-2", main_layers=24, decoder_layers=8, **_PAPER),
    # Table 6: other distributions at ~1.6B in total (d = 1024, 2 decoder layers, main depth
    # chosen so one expert is ~1.6B / K: 2-6 ~800M, 4-3 ~400M, 12-1 ~140M).
    "isolated-1.6b-2-6": dict(distribution="2-6", main_layers=46, decoder_layers=2, **_PAPER),
    "isolated-1.6b-3-4": dict(distribution="3-4", main_layers=30, decoder_layers=2, **_PAPER),
    "isolated-1.6b-4-3": dict(distribution="4-3", main_layers=22, decoder_layers=2, **_PAPER),
    "isolated-1.6b-12-1": dict(distribution="12-1", main_layers=6, decoder_layers=2, **_PAPER),
    # Table 3 single baselines (1-12, accumulated = Table 5 "Accumu. AR"; the 1.6B one is
    # Table 6's 1-12 row). Parameter-matched by depth at d = 1024 for 530M; 1.6B and 3.3B
    # are widened to d = 2048 (a 1.6B single model at d = 1024 would need ~97 blocks).
    "single-530m": dict(distribution="1-12", main_layers=29, decoder_layers=2, **_PAPER),
    "single-1.6b": dict(distribution="1-12", dim=2048, main_layers=23, decoder_layers=2, attn_heads=16),
    "single-3.3b": dict(distribution="1-12", dim=2048, main_layers=45, decoder_layers=8, attn_heads=16),
}

# Sizes the paper states for a preset: (parameters, "total" or "per expert", where).
PAPER_SIZES: dict[str, tuple[float, str, str]] = {
    "isolated-1.6b": (1632e6, "total", "Table 2"),
    "isolated-3.1b": (3084e6, "total", "Table 2"),
    "isolated-1.6b-2-6": (800e6, "per expert", "Table 6"),
    "isolated-1.6b-4-3": (400e6, "per expert", "Table 6"),
    "isolated-1.6b-12-1": (140e6, "per expert", "Table 6"),
    "single-530m": (530e6, "total", "Table 3"),
    "single-1.6b": (1.6e9, "total", "Table 3, Table 6 1-12"),
    "single-3.3b": (3.3e9, "total", "Table 3"),
}


def presets(prefix: str = "") -> dict[str, dict[str, dict[str, Any]]]:
    """The ``scale`` preset group for ``siren.config.load_config``; ``prefix`` (e.g. "model.")
    when ModelConfig is nested inside a larger config."""
    return {group: {name: {prefix + k: v for k, v in kv.items()} for name, kv in table.items()}
            for group, table in (("scale", SCALES), ("arch", ARCHS))}
