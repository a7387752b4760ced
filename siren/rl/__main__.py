"""python -m siren.rl run_dir=RUN out=NEW_RUN prompts=CAPTIONS [align=anti_causal n=1 method=grpo ...]"""
from siren.cli import run
from siren.rl.alignment import AlignConfig, main
from siren.rl.config import PRESETS

if __name__ == "__main__":
    run(main, AlignConfig, __doc__, presets=PRESETS)
