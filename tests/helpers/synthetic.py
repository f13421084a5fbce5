"""Write a dataset directory in pretrain-data's exact format from given token samples.

For loader and trainer tests that need many shards of known content fast; the real writer is
tested in tests/tokenizer/. Each sample's first token can carry its index so that a test can
tell exactly which samples a rank saw.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from pretrain.data.manifest import compute_fingerprint, sha256_file

TOKENIZER = {"version": "1.0", "note": "synthetic dataset: no real tokenizer"}


def write_split(root: Path, split: str, samples: np.ndarray, per_shard: List[int],
                pax: bool = False) -> List[Dict]:
    """pax: each member gets a PAX extended header first (a valid tar in another layout than
    pretrain-data's, as other writers produce)."""
    (root / split).mkdir(parents=True, exist_ok=True)
    shards, i = [], 0
    for n, count in enumerate(per_shard):
        rel = f"{split}/shard-{n:06d}.tar"
        fmt = tarfile.PAX_FORMAT if pax else tarfile.USTAR_FORMAT
        with tarfile.open(root / rel, "w", format=fmt) as tar:
            for j in range(i, i + count):
                payload = samples[j].astype(samples.dtype).tobytes()
                info = tarfile.TarInfo(f"{j:010d}.tokens")
                info.size = len(payload)
                if pax:
                    info.pax_headers = {"comment": f"sample {j}"}
                tar.addfile(info, io.BytesIO(payload))
        shards.append({"path": rel, "samples": count, "tokens": count * samples.shape[1],
                       "bytes": (root / rel).stat().st_size, "sha256": sha256_file(str(root / rel))})
        i += count
    return shards


def write_dataset(root: Path, train: np.ndarray, per_shard: List[int], vocab_size: int,
                  val: Optional[np.ndarray] = None, val_per_shard: Optional[List[int]] = None,
                  pax: bool = False) -> Path:
    """train/val: (n, seq_len + 1) arrays (uint16); per_shard: samples in each shard."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.json").write_text(json.dumps(TOKENIZER))
    tok_sha = sha256_file(str(root / "tokenizer.json"))
    splits = {"train": write_split(root, "train", train, per_shard, pax)}
    if val is not None:
        splits["val"] = write_split(root, "val", val, val_per_shard or [len(val)])
    seq_len = train.shape[1] - 1
    manifest = {
        "format": "pretrain-shards/1", "seq_len": seq_len, "sample_tokens": seq_len + 1,
        "dtype": "uint16", "vocab_size": vocab_size, "eod_id": 0,
        "tokenizer": {"file": "tokenizer.json", "sha256": tok_sha},
        "splits": {name: {"samples": sum(s["samples"] for s in sh),
                          "tokens": sum(s["tokens"] for s in sh), "dropped_tokens": 0, "shards": sh}
                   for name, sh in splits.items()},
        "source": {"inputs": ["synthetic"], "documents": 0, "bytes": 0, "skipped_files": 0},
        "fingerprint": compute_fingerprint(tok_sha, seq_len, "uint16", splits),
        "created_by": "tests",
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


def indexed_samples(n: int, seq_len: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    """Random tokens whose first two tokens spell the sample index (base vocab_size)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(1, vocab_size, size=(n, seq_len + 1), dtype=np.int64)
    x[:, 0] = np.arange(n) // vocab_size
    x[:, 1] = np.arange(n) % vocab_size
    return x.astype(np.uint16)


def sample_index(row, vocab_size: int) -> int:
    return int(row[0]) * vocab_size + int(row[1])
