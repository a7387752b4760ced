"""Data: manifests -> (load, mono, 16 kHz, crop/pad) -> cached codes + text states -> training batches.

    python -m siren.data.demo out=DIR                  # the embedded demo set (15 synthetic classes)
    python -m siren.data.prepare manifest=... out=...  # cache codes + text states, index per split
    siren.data.PreparedDataset(prepared_dir, "train", crop_s=6.0)  # what training reads (siren.data.stage1)
"""
from siren.data.dataset import PreparedDataset, make_loader
from siren.errors import DataError

__all__ = ["DataError", "PreparedDataset", "make_loader"]
