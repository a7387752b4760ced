"""Table 5: conditional strategies for the causal relation of inter-RVQ-layer codes. Loss mean is
the mean over the 12 layers of the final per-layer loss, loss ratio is 12th / 1st
(analysis.convergence.loss_stats)."""
from ablations.grid import Grid, Row

_SINGLE = {"model.size": "single-1.6b", "model.distribution": "1-12"}

GRID = Grid(
    name="table5",
    title="Ablating different conditional strategies to model the causal relationship of inter-RVQ layer codes.",
    columns=("Loss Mean", "Loss Ratio", "FAD"),
    rows=(
        Row("Indpdt.", {**_SINGLE, "model.conditioning": "none"},
            {"Loss Mean": 1.19, "Loss Ratio": 1.95, "FAD": 4.09}),
        Row("AR", {**_SINGLE, "model.conditioning": "residual"},
            {"Loss Mean": 0.88, "Loss Ratio": 2.17, "FAD": 4.19}),
        Row("Accumu. AR", {**_SINGLE, "model.conditioning": "accumulated"},
            {"Loss Mean": 0.80, "Loss Ratio": 2.15, "FAD": 3.88}),
        Row("Collaborative (ours)", {"model.size": "isolated-1.6b", "model.distribution": "6-2",
                                     "model.conditioning": "accumulated"},
            {"Loss Mean": 0.29, "Loss Ratio": 1.55, "FAD": 1.44}),
    ),
)
