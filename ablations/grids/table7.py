"""Table 7: ablating the reinforcement-learning components (direction and number of aligned experts)."""
from ablations.grid import Grid, Row

_SIREN = {"model.size": "isolated-1.6b", "model.distribution": "6-2", "model.conditioning": "accumulated",
          "rl.method": "grpo"}

GRID = Grid(
    name="table7",
    title="Ablating reinforcement learning components.",
    columns=("#Train Parameter", "CLAP", "ISC", "FD"),
    rows=(
        Row("Anti-Causal, 1 model", {**_SIREN, "rl.align": "anti_causal", "rl.n": 1},
            {"#Train Parameter": "270M", "CLAP": 24.18, "ISC": 12.85, "FD": 10.65}),
        Row("Anti-Causal, 2 models", {**_SIREN, "rl.align": "anti_causal", "rl.n": 2},
            {"#Train Parameter": "540M", "CLAP": 25.12, "ISC": 12.77, "FD": 10.80}),
        Row("Causal, 1 model", {**_SIREN, "rl.align": "causal", "rl.n": 1},
            {"#Train Parameter": "270M", "CLAP": 18.31, "ISC": 9.55, "FD": 12.27}),
    ),
)
