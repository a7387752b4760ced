"""Data: manifests -> (load, mono, 16 kHz, crop/pad) -> cached codes + text states -> training batches.

    python -m siren.data.demo out=DIR                  # the embedded demo set (15 synthetic classes)
    python -m siren.data.prepare manifest=... out=...  # cache codes + text states, index per split
    siren.data.make_loader(prepared_dir, "train", batch_size=8, crop_s=6.0, shuffle=True, seed=0)
"""
from siren.data.dataset import PreparedDataset, make_loader
from siren.errors import DataError

__all__ = ["DataError", "PreparedDataset", "make_loader"]
