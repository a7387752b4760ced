"""python -m siren.demo_assets train: rebuild every demo weights file from the embedded set, in order
(the codec first: the metric backbones also train on audio resynthesised by it, when it exists)."""
from siren import cli
from siren.errors import ConfigError


def main(argv: list[str]) -> int:
    if argv[:1] != ["train"]:
        raise ConfigError("usage: python -m siren.demo_assets train [key=value ...] (keys of "
                          "siren.demo_assets.codec and siren.demo_assets.backbones)")
    from siren.demo_assets import backbones, codec

    codec.main([])
    return backbones.main([])


if __name__ == "__main__":
    cli.run(main, None, __doc__)
