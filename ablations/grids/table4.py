"""Table 4: ablating among major modules (collaboration, residual / accumulated condition, RL)."""
from ablations.grid import Grid, Row

_ISO = {"model.size": "isolated-1.6b", "model.distribution": "6-2"}

GRID = Grid(
    name="table4",
    title="Ablating among major modules.",
    columns=("FD", "ISC", "CLAP"),
    rows=(
        Row("Baseline (AudioGen-style parallel heads)",
            {"model.size": "single-1.6b", "model.distribution": "1-12", "model.conditioning": "none"},
            {"FD": 29.65, "ISC": 7.86, "CLAP": 13.24}),
        Row("+ Collaboration", {**_ISO, "model.conditioning": "none"}, "itg"),
        Row("+ Residual Con.", {**_ISO, "model.conditioning": "residual"},
            {"FD": 14.66, "ISC": 8.90, "CLAP": 15.09}),
        Row("+ Accumulated Cond.", {**_ISO, "model.conditioning": "accumulated"},
            {"FD": 12.09, "ISC": 10.70, "CLAP": 17.07}),
        Row("+ RL Align", {**_ISO, "model.conditioning": "accumulated", "rl.method": "grpo",
                           "rl.align": "anti_causal", "rl.n": 1},
            {"FD": 10.65, "ISC": 12.85, "CLAP": 24.18}),
    ),
)
