"""What a stage-1 job reads (siren.train): the prepared train/test datasets with their collate function,
the codec's frozen code tables, and the run-config entries of the codec and text encoder; for
``family=continuous``, the latent datasets and their projection (siren.data.latents)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset

from siren.codec import CodeTables
from siren.data.dataset import PreparedDataset, load_index
from siren.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class Stage1Data:
    """What a stage-1 job reads: train/test datasets (indexed by (epoch, index)) with their collate
    function, the codec's frozen code tables for the embeddings, and the run-config entries of the
    codec and text encoder the data was made with ({"id", "weights", "config"}). For family=continuous the
    datasets yield ``latents`` [T, k] instead of codes, and ``projection`` is the LatentProjection they come from."""
    train: Dataset
    val: Dataset | None
    collate: Callable[[list[dict]], dict]
    tables: CodeTables
    codec: dict
    text: dict
    projection: object = None  # siren.model.continuous.LatentProjection (family=continuous)

    @classmethod
    def from_prepared(cls, data_dir: str | Path, crop_s: float | None, seed: int, codec_cfg,
                      crop_min_clap: float = 0.0, latent_dim: int = 0) -> "Stage1Data":
        """The prepared train/test splits of ``data_dir``; the code tables come from a codec built from
        ``codec_cfg``, which must be the codec the data was encoded with. ``crop_min_clap``: appendix B's
        crop filter on the train split. ``latent_dim`` > 0: continuous tokens of that width (siren.data.latents)."""
        from siren.frontends import build_codec, check_keys, codec_entry, text_entry

        proj = None
        if latent_dim:  # family=continuous: the latents of the same items, in the projection's axes
            from siren.data.latents import LatentDataset, load_projection

            proj = load_projection(data_dir, latent_dim, load_index(data_dir, "train")["codec"]["id"])
            split = lambda name, crop, clap=0.0: LatentDataset(data_dir, name, crop, seed, proj.id, clap)
        else:
            split = lambda name, crop, clap=0.0: PreparedDataset(data_dir, name, crop, seed, clap)
        train = split("train", crop_s, crop_min_clap)
        try:  # validation on whole items, as the authors' code: a crop would score one random window of each
            val = split("test", None)
        except DataError as e:
            log.warning("no validation: %s", e)
            val = None
        if val is not None and not len(val):  # logged {"val": true, "frames": 0}, no loss, no word
            log.warning("no validation: the test split of %s holds no item", data_dir)
            val = None
        if val is not None:  # validation CE on codes of another codec, or captions of another encoder, means nothing
            diff = [k for k in ("codec", "text") if val.info[k]["id"] != train.info[k]["id"]]
            if diff:
                ids = ", ".join(f"{val.info[k]['id']} vs {train.info[k]['id']}" for k in diff)
                raise ConfigError(f"{data_dir}: the test split was prepared with another {' and '.join(diff)} than the "
                                  f"train split ({ids}); prepare the test manifest again with the train split's "
                                  f"codec.* and text.* keys")
        for name, ds in (("train", train), ("test", val)) if latent_dim else ():
            if ds is not None:
                ds.check_tokens(name)
        check_keys({"codec": train.info.get("frontends", {}).get("codec")}, {"codec": codec_cfg},
                   f"{data_dir} was prepared")
        codec = build_codec(codec_cfg)
        if train.info["codec"]["id"] != codec.id:
            raise ConfigError(f"{data_dir} was prepared with codec {train.info['codec']['id']}, this config builds "
                              f"{codec.id} (codec.weights={codec_cfg.weights}); set codec.weights to the prepared "
                              f"one or prepare again")
        text = {**train.info["text"], "config": train.info.get("frontends", {}).get("text")}
        return cls(train, val, train.collate, codec.code_tables(), codec_entry(codec), text_entry(text), proj)
