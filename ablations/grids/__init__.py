"""One module per paper table/figure, each defining GRID. Cells are config deltas:
`model.size` names the paper's model size (mapped to a preset by the scale: demo or paper),
`model.distribution` is K-m, `model.conditioning` is none|residual|accumulated, and `rl.*`
adds stage 2 (anti-causal alignment)."""
