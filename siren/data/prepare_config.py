"""The settings of ``python -m siren.data.prepare`` (siren/data/prepare.py): which manifest, where to, the
audio policy, the codec and text encoder, sharding and batching; checked when read, before any model loads."""
from __future__ import annotations

from dataclasses import dataclass, field

from siren.codec import CodecConfig
from siren.config import check_numbers
from siren.data.audio import AudioConfig
from siren.data.demo import N_TEST, N_TRAIN
from siren.data.encode import TEXT_DTYPES
from siren.errors import DataError
from siren.runtime import check_device
from siren.text import TextConfig

ON_ERROR = ("stop", "skip")


@dataclass
class PrepareConfig:
    manifest: str = ""  # CSV/JSONL manifest, or "demo": the embedded demo set (both splits, made under out/demo_source)
    out: str = ""  # prepared directory (caches + splits/)
    split: str = ""  # default: the manifest's file name without extension
    audio: AudioConfig = field(default_factory=AudioConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    text: TextConfig = field(default_factory=TextConfig)
    text_dtype: str = "float16"  # storage dtype of the text states (part of the text cache key)
    num_shards: int = 1
    shard: int = -1  # >= 0: encode only this shard (one job-array element); no index
    step: str = "all"  # all: encode every shard (in `workers` processes), then index; index: merge only
    workers: int = 1  # local processes for step=all (each builds its own codec and text encoder)
    # Items per model call. With 1 a cached entry is a pure function of its key; batched calls can
    # differ in the last bits with the batch's other items (text states: ~3e-6, below float16 storage).
    batch_size: int = 1  # items (segments) per codec call, equal shapes only; bounds memory; 1 is fastest on CPU
    text_batch_size: int = 32  # one caption per call is ~7x slower on CPU (0.5 s vs 0.07 s per caption)
    on_error: str = "stop"  # stop: one error listing every bad file; skip: leave them out, listed in the index
    device: str = "auto"  # auto: cuda when available, else cpu
    demo_seed: int = 0  # manifest=demo only: the demo set's seed and clips per class (train, test)
    demo_train: int = N_TRAIN
    demo_test: int = N_TEST
    # > 0: score each item's crops of train.crop_s seconds with CLAP for the crop filter (appendix B; crops.py)
    crop_s: float = 0.0
    crop_step_s: float = 0.5  # the grid of crop offsets

    def __post_init__(self):
        check_numbers(self, positive=("num_shards", "workers", "batch_size", "text_batch_size", "demo_train",
                                      "demo_test"), nonneg=("demo_seed", "crop_s"))
        if self.crop_s > 0 and not self.crop_step_s > 0:
            raise DataError(f"crop_step_s must be > 0 when crop_s > 0, got {self.crop_step_s}")
        if not -1 <= self.shard < self.num_shards:
            raise DataError(f"shard={self.shard} must be in [0, num_shards={self.num_shards}) (or -1: every shard)")
        if "/" in self.split or "\\" in self.split or ".." in self.split:
            raise DataError(f"split={self.split!r} names the file <out>/splits/<split>.json: give a plain name "
                            f"without '/', '\\' or '..' (e.g. split=train)")
        if self.text_dtype not in TEXT_DTYPES or self.on_error not in ON_ERROR:
            raise DataError(f"text_dtype must be one of {list(TEXT_DTYPES)} and on_error one of {list(ON_ERROR)}; "
                            f"got {self.text_dtype!r}, {self.on_error!r}")
        if self.manifest == "demo" and self.split:  # it wrote train.json and test.json without a word
            raise DataError(f"split={self.split}: manifest=demo prepares the splits train and test; leave split out")
        check_device(self.device)
        self.audio.validate()  # before the models load (minutes at paper scale)
