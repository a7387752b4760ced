"""paper/003 (Yang et al., ICML 2025): the continuous-token LM with a per-token diffusion head, with and without
masked next-token prediction, beside the discrete AudioGen-style baseline and Siren 6-2, on one codec, data and
protocol. The paper reports relative gains only (abstract), so its numbers are notes; #Parameter lists its sizes."""
from ablations.grid import Grid, Row

_CONT = {"model.family": "continuous"}

GRID = Grid(
    name="continuous",
    title="Continuous-valued tokens (paper/003) vs discrete RVQ tokens (AudioGen-style baseline, Siren 6-2).",
    columns=("#Parameter", "FAD", "KL", "CLAP"),
    figure="metrics",
    rows=(  # the baseline is Tables 4/5's "Indpdt." cell and Siren 6-2 theirs: the same hashes, run once
        Row("AudioGen-style (discrete 1-12, parallel heads)",
            {"model.size": "single-1.6b", "model.distribution": "1-12", "model.conditioning": "none"}, {}),
        *(Row(f"Continuous LM{' + MNTP' if mntp else ''}, {size}",
              {**_CONT, "model.size": f"cont-{size.lower()}", "model.mntp": mntp}, {"#Parameter": n})
          for mntp in (False, True) for size, n in (("Base", "193M"), ("Large", "462M"))),
        Row("Siren 6-2 (reference)", {"model.size": "isolated-1.6b", "model.distribution": "6-2"}, {}),
    ),
    notes=("paper/003 reports relative numbers only: the continuous LM improves FAD by 20% and KL by 40% over "
           "AudioGen; with MNTP, FAD improves by 41% over AudioGen Base (285M) and 33% over AudioGen Large (1B).",
           "At scale=demo Base and Large both use the tiny preset (cont-tiny): each pair shares one cell."),
)
