"""Demo weights: real weights the project trains itself on the embedded demo set (``siren.data.demo``),
committed under ``files/`` and selected with ``weights=demo``. Every output made with them says
"demo weights (trained on the embedded set)". ``backbones`` rebuilds the metric networks'
(PANNs, VGGish) and ``clap_heads`` LAION-CLAP's; ``store`` reads and writes the files.
"""
