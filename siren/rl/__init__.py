"""Stage 2: anti-causal alignment (section 4.2, Eq. 7-11, Algorithm 3) and its variants.

- ``objective``: group advantages (Eq. 9), gamma filter, clipped surrogate (Eq. 10-11), KL, DPO.
- ``reward``: text-audio rewards (Eq. 8): LAION-CLAP, ImageBind (``imagebind``), and a synthetic code reward for tests.
- ``rollout``: G generations per prompt with all experts; action log-probabilities.
- ``update``: the policy update over a rollout batch (Algorithm 3 lines 6-9: GRPO's mu steps or DPO), in micro-batches.
- ``alignment``: the training loop and the CLI (``python -m siren.rl``); ``config``: its keys.
- ``run_dir``: the stage-1 run it reads and the new run it makes (frozen experts linked in, ``alignment.json``).
- ``imagebind``: ImageBind-Huge's text and audio branches, for ``reward=imagebind``.
"""
