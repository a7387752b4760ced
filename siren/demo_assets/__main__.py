"""python -m siren.demo_assets train: rebuild every demo weights file from the embedded set, in order
(the codec first: the metric backbones then train on audio resynthesised by the codec just built).

    python -m siren.demo_assets train
    python -m siren.demo_assets train codec.ft_steps=4000 backbones.panns_steps=500

Keys go to one part each, ``codec.KEY=VALUE`` (``python -m siren.demo_assets.codec --help`` lists
them) or ``backbones.KEY=VALUE`` (``python -m siren.demo_assets.backbones --help``). Both sets are
checked before anything trains, so a typo does not surface only after the codec's build (hours on a CPU).
Stopped in the codec's build, the same command resumes it (``siren.demo_assets.resume``); stopped in the
backbones' (minutes), ``python -m siren.demo_assets.backbones`` redoes them alone on the codec just written
(on the same machine, the same files: each recipe's random draws come from its seed alone)."""
from pathlib import Path

from siren import cli
from siren.config import load_config
from siren.errors import ConfigError

USAGE = ("usage: python -m siren.demo_assets train [codec.KEY=VALUE ...] [backbones.KEY=VALUE ...] "
         "(keys: python -m siren.demo_assets.codec --help, python -m siren.demo_assets.backbones --help)")


def split_keys(args: list[str], parts) -> dict[str, list[str]]:
    """``codec.x=1 backbones.y=2`` -> {"codec": ["x=1"], "backbones": ["y=2"]}; a key without a part is refused."""
    keys = {part: [] for part in parts}
    for arg in args:
        part, dot, rest = arg.partition(".")
        if part not in keys or not dot or "=" not in rest:
            raise ConfigError(f"'{arg}': give each key with the part it belongs to, codec.KEY=VALUE or "
                              f"backbones.KEY=VALUE\n{USAGE}")
        keys[part].append(rest)
    return keys


def main(argv: list[str]) -> int:
    if argv[:1] != ["train"]:
        raise ConfigError(USAGE)
    from siren.demo_assets import backbones, codec

    schemas = {"codec": codec.CodecRecipe, "backbones": backbones.BuildConfig}
    keys = split_keys(argv[1:], schemas)
    cfgs = {}
    for part, schema in schemas.items():
        try:
            cfgs[part] = load_config(schema, keys[part])
        except ConfigError as e:
            raise ConfigError(f"{part}.* keys: {e}") from None
    codec.run(cfgs["codec"])
    # the backbones train on the codec just built (its out=) and are written beside it, unless backbones.codec= /
    # backbones.out= say otherwise: a scratch build (codec.out=/tmp/c.pth) replaced the committed backbones
    given = {k.split("=", 1)[0] for k in keys["backbones"]}  # a command line gives each key once (given_once)
    built = [] if "codec" in given else [f"codec={cfgs['codec'].out}"]
    beside = [] if "out" in given else [f"out={Path(cfgs['codec'].out).parent}"]
    return backbones.main([*built, *beside, *keys["backbones"]])


if __name__ == "__main__":
    cli.run(main, None, __doc__)
