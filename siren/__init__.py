"""Siren: anti-causally aligned collaborative residual transformers for text-to-audio.

Core package: codec (RVQ tokenizer), text encoder, data, model, stage-1 training,
sampling and stage-2 alignment. Imports none of eval/, ablations/, analysis/, except
siren.demo_assets: the builders of the demo weights train eval's metric networks (eval.backbones).
"""
import os

# Compute nodes run offline: without this, transformers/huggingface_hub retry the network
# for minutes when laion_clap builds its tokenizers at import. `python -m siren.assets
# prefetch` (run on a login node with internet) turns it off for itself.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load(run_dir, device="cpu", allow_unfinished: bool = False):
    """The trained K experts of a run directory as a ``CollaborativeModel`` (a ``ContinuousLM`` for a
    ``family=continuous`` run), ready to sample.

    See ``siren.run_dir.load_run``; imported lazily so ``import siren`` stays light."""
    from siren.run_dir import load_run

    return load_run(run_dir, device, allow_unfinished)
