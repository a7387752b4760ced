"""Memory of a prepared training index at the paper's size, in the training process and its loader workers.

    python -m benchmarks.index_memory                    # 450k synthetic items, 2 workers, one epoch
    python -m benchmarks.index_memory items=100000 workers=4

Writes a synthetic ``splits/train.json`` (the fields prepare writes for a 10 s clip, no crop tables), builds
``PreparedDataset`` from it and runs one epoch of a ``DataLoader`` whose items read what a training draw reads
(``real_frames``, the codes and text keys; no cache file is opened), then prints the load time, the unique
memory (USS, ``/proc/<pid>/smaps_rollup``: Linux only) of the process and of the workers, and the digest's time.
A worker's reads of Python objects write their reference counts, so it copies each page of them it touches.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from siren import cli
from siren.config import check_numbers, load_config


@dataclass
class IndexMemoryConfig:
    items: int = 450_000
    workers: int = 2
    batch_size: int = 256

    def __post_init__(self):
        check_numbers(self, positive=("items", "workers", "batch_size"))


def write_index(folder: Path, n: int) -> Path:
    rng, items = random.Random(0), []
    for i in range(n):
        h = f"{rng.getrandbits(256):064x}"
        items.append({"id": f"Y{h[:11]}_{i}", "caption": "A man speaks while a vehicle engine revs and birds chirp",
                      "label": None, "source": f"/data/audioset/{h[:2]}/{h[:11]}.flac", "source_sha256": h,
                      "source_stat": [1234567, 1700000000123456789, 1700000000123456789], "codes": h[:40],
                      "segment": 0, "text": h[24:64], "frames": 500, "real_frames": 500})
    path = folder / "splits" / "train.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"split": "train", "num_items": n, "skipped": [], "items": items}, indent=2,
                               sort_keys=True) + "\n")
    return path


def uss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean", "Private_Dirty"))) / 1024


class Touch:
    """What a training draw reads of an item, without the cache files."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> int:
        it = self.ds.items[i]
        return self.ds.real_frames(i) + len(it["codes"]) + len(it["text"])


def main(argv: list[str] | None = None) -> None:
    from torch.utils.data import DataLoader

    from siren.data.dataset import PreparedDataset

    cfg = load_config(IndexMemoryConfig, cli.start(argv))
    with tempfile.TemporaryDirectory(prefix="siren-index-") as tmp:
        path = write_index(Path(tmp), cfg.items)
        base = uss_mb(os.getpid())
        t = time.perf_counter()
        ds = PreparedDataset(tmp, "train", crop_s=6.0)
        load = time.perf_counter() - t
        held = uss_mb(os.getpid()) - base
        loader = DataLoader(Touch(ds), batch_size=cfg.batch_size, num_workers=cfg.workers, shuffle=True,
                            persistent_workers=True)
        for _ in loader:
            pass
        workers = sum(uss_mb(w.pid) for w in loader._iterator._workers)
        t = time.perf_counter()
        digest = ds.digest
        print(f"{cfg.items} items, {path.stat().st_size / 1e6:.0f} MB of JSON: load {load:.1f} s; the index holds "
              f"{held:.0f} MB in the process; its {cfg.workers} loader workers' USS after an epoch {workers:.0f} MB; "
              f"digest {time.perf_counter() - t:.1f} s ({digest})")


if __name__ == "__main__":
    cli.run(main, IndexMemoryConfig, __doc__)
