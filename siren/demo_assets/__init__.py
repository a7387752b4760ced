"""Demo weights: real weights the project trains itself on the embedded demo set (siren.data.demo),
so that the default ``scale=demo`` measures something on a machine without downloads.

Each builder here rebuilds one committed file under ``files/`` from a fixed seed; the loaders
of the pretrained components read them through the same code and file layout (``weights=demo``),
and every output made with them says "demo weights (trained on the embedded set)".

    python -m siren.demo_assets.codec      # files/dac16k_demo.pth (siren.codec, weights=demo)
"""
