"""Figure 5: reward curves of RL (anti-causal), DPO (anti-causal) and causal RL; each curve labelled
with its (FD, CLAP) pair. The paper prints no pair here: the RL rows carry Table 7's numbers for the same
settings (Anti-Causal 1, Causal 1); DPO has none in the paper."""
from ablations.grid import Grid, Row

_SIREN = {"model.size": "isolated-1.6b", "model.distribution": "6-2", "model.conditioning": "accumulated"}

GRID = Grid(
    name="figure5",
    title="Rewards (ImageBind Cosine) changing curves among different reinforcement learning strategies.",
    columns=("FD", "CLAP"),
    rows=(
        Row("RL (anti-causal)", {**_SIREN, "rl.method": "grpo", "rl.align": "anti_causal", "rl.n": 1},
            {"FD": 10.65, "CLAP": 24.18}),
        Row("DPO (anti-causal)", {**_SIREN, "rl.method": "dpo", "rl.align": "anti_causal", "rl.n": 1}, {}),
        Row("RL (causal)", {**_SIREN, "rl.method": "grpo", "rl.align": "causal", "rl.n": 1},
            {"FD": 12.27, "CLAP": 18.31}),
    ),
    figure="reward_curves",
    notes=("The paper's text prints no (FD, CLAP) pairs for Figure 5: its RL rows here are Table 7's for the same "
           "settings (Anti-Causal, 1 model; Causal, 1 model); DPO's has none.",),
)
