"""Table 3: ablating different architecture options (single transformers vs isolated experts,
parameter-matched)."""
from ablations.grid import Grid, Row

GRID = Grid(
    name="table3",
    title="Ablating different architecture options.",
    columns=("#Parameter", "FAD", "FD", "CLAP"),
    rows=(
        Row("Small Single", {"model.size": "single-530m", "model.distribution": "1-12"},
            {"#Parameter": "530M", "FAD": 8.22, "FD": 40.44, "CLAP": 4.81}),
        Row("Base Single", {"model.size": "single-1.6b", "model.distribution": "1-12"},
            {"#Parameter": "1.6B", "FAD": 3.88, "FD": 25.18, "CLAP": 7.79}),
        Row("Large Single", {"model.size": "single-3.3b", "model.distribution": "1-12"},
            {"#Parameter": "3.3B", "FAD": 1.92, "FD": 11.12, "CLAP": 15.64}),
        Row("Isolated-Small", {"model.size": "isolated-1.6b", "model.distribution": "6-2"},
            {"#Parameter": "1.6B", "FAD": 1.44, "FD": 12.09, "CLAP": 17.07}),
        Row("Isolated-Large", {"model.size": "isolated-3.1b", "model.distribution": "6-2"},
            {"#Parameter": "3.1B", "FAD": 1.21, "FD": 9.90, "CLAP": 20.24}),
    ),
    notes=("All rows use the accumulated condition; single = distribution 1-12.",),
)
