"""The datasets a run reads: data.path plus any blend, checked to fit together before training."""

from __future__ import annotations

import hashlib
import json
from typing import List, Tuple

from pretrain.config import DataConfig
from pretrain.data import shardspec
from pretrain.data.manifest import Manifest
from pretrain.errors import DataError

Sources = List[Tuple[Manifest, float]]


def load_sources(cfg: DataConfig) -> Sources:
    """Load every manifest (shards checked to exist) and require one tokenizer and one seq_len."""
    elsewhere = bool(cfg.shards_url or cfg.shards)
    primary = Manifest.load(cfg.path, check_files=not elsewhere)
    if cfg.shards_url:
        primary = primary.with_shard_urls(cfg.shards_url)
    if cfg.shards:
        primary = primary.select_shards("train", shardspec.expand(cfg.shards), cfg.shards)
    if elsewhere:
        primary.check_files()  # local locations are still checked; remote ones are not
    sources = [(primary, float(cfg.weight))]
    sources += [(Manifest.load(path), float(w)) for path, w in zip(cfg.blend, cfg.blend_weights)]
    first = sources[0][0]
    for m, _ in sources[1:]:
        if m.tokenizer_sha256 != first.tokenizer_sha256:
            raise DataError(f"data.blend: {m.root} was tokenized with another tokenizer than "
                            f"{first.root}; re-run pretrain-data with --tokenizer {first.tokenizer_path}")
        if m.seq_len != first.seq_len:
            raise DataError(f"data.blend: {m.root} holds {m.seq_len}-token sequences, {first.root} "
                            f"{first.seq_len}; write both with the same --seq-len")
    return sources


def fingerprint(sources: Sources) -> str:
    """One dataset's own fingerprint; for a blend, a hash of every fingerprint and weight."""
    if len(sources) == 1:
        return sources[0][0].fingerprint
    canon = [[m.fingerprint, round(w / sum(x for _, x in sources), 9)] for m, w in sources]
    return hashlib.sha256(json.dumps(canon).encode()).hexdigest()
