"""Stage 2: anti-causal alignment (section 4.2, Eq. 7-11, Algorithm 3) and its variants.

- ``objective``: group advantages (Eq. 9), gamma filter, clipped surrogate (Eq. 10-11), KL, DPO.
- ``reward``: text-audio rewards (Eq. 8): LAION-CLAP, ImageBind (``imagebind``), and a synthetic code reward for tests.
- ``rollout``: G generations per prompt with all experts; action log-probabilities.
- ``alignment``: the training loop, the new run directory, the CLI (``python -m siren.rl``).
"""
