"""python -m siren.rl run_dir=RUN out=NEW_RUN prompts=CAPTIONS [align=anti_causal n=1 method=grpo ...]"""
import sys

from siren.checkpoint import CheckpointError
from siren.config import ConfigError
from siren.rl.alignment import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, CheckpointError, FileNotFoundError) as e:  # bad input: the message says the fix
        print(f"python -m siren.rl: {e}", file=sys.stderr)
        sys.exit(2)
