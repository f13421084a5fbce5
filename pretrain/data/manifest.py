"""The dataset contract between `pretrain-data` (tokenizer/) and the trainer's loader.

A dataset directory holds `manifest.json`, `tokenizer.json` and WebDataset tar shards under
`train/` and `val/`. Each tar member `{key:010d}.tokens` is one sample: the raw little-endian bytes
of `sample_tokens = seq_len + 1` token ids (inputs are sample[:-1], targets sample[1:]).
The manifest is written last, so a directory without one is an incomplete write.

The trainer reads shards only through this module: `Manifest.load(dir)`, then
`manifest.split("train").shards[i].url` and `decode_sample(payload, manifest)`.

A manifest is data that people share, so it names each shard only by its path under the dataset
directory: never a URL, an absolute path, a path out through `..`, or a `pipe:` command (which
webdataset would run with a shell on every rank). Where shards live, and any command that fetches
them, come from the user's own config: `data.shards_url` and `data.shards`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from pretrain.errors import DataError

FORMAT = "pretrain-shards/1"
MANIFEST_NAME = "manifest.json"
SAMPLE_SUFFIX = "tokens"  # tar member `{key}.tokens`; webdataset exposes it as sample["tokens"]
KEY_DIGITS = 10
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
# Shards are USTAR tars: every member is a 512-byte header then its payload padded to 512.
TAR_BLOCK = 512

_TOP_KEYS = ("format", "seq_len", "sample_tokens", "dtype", "vocab_size", "eod_id", "tokenizer",
             "splits", "fingerprint")
_SPLIT_KEYS = ("samples", "tokens", "shards")
_SHARD_KEYS = ("path", "samples", "tokens", "bytes", "sha256")


def dtype_for_vocab(vocab_size: int) -> str:
    """The narrowest token dtype that holds every id of a vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def member_bytes(payload_bytes: int) -> int:
    """Bytes one tar member of `payload_bytes` takes: its header and its padded payload."""
    return TAR_BLOCK + -(-payload_bytes // TAR_BLOCK) * TAR_BLOCK


def tar_checksum(header: bytes) -> int:
    """A tar header's checksum: the sum of its 512 bytes with the checksum field as spaces."""
    return sum(header[:148]) + 8 * ord(" ") + sum(header[156:TAR_BLOCK])


def is_remote(path: str) -> bool:
    """URLs and `pipe:` commands are handed to webdataset as given and not checked on disk."""
    return path.startswith("pipe:") or "://" in path


@dataclass(frozen=True)
class ShardInfo:
    path: str  # as written in the manifest: relative to the dataset root
    url: str  # what to open: the absolute local path, or where data.shards_url / data.shards say
    samples: int
    tokens: int
    bytes: int
    sha256: str

    def to_dict(self) -> Dict[str, Any]:
        return {"path": self.path, "samples": self.samples, "tokens": self.tokens,
                "bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class SplitInfo:
    name: str
    samples: int
    tokens: int
    shards: List[ShardInfo]
    dropped_tokens: int = 0  # the final partial sample of the split's token stream

    @property
    def urls(self) -> List[str]:
        return [s.url for s in self.shards]

    def to_dict(self) -> Dict[str, Any]:
        return {"samples": self.samples, "tokens": self.tokens,
                "dropped_tokens": self.dropped_tokens,
                "shards": [s.to_dict() for s in self.shards]}


def compute_fingerprint(tokenizer_sha256: str, seq_len: int, dtype: str,
                        splits: Mapping[str, Iterable[Mapping[str, Any]]]) -> str:
    """sha256 over what decides the token stream: the tokenizer, the sample length, the dtype and
    each split's ordered shards as (path, samples, sha256). `splits` maps a split name to its
    shards as manifest dicts (or anything with those keys)."""
    canon = {
        "tokenizer_sha256": tokenizer_sha256,
        "seq_len": int(seq_len),
        "dtype": str(dtype),
        "splits": {name: [[s["path"], int(s["samples"]), s["sha256"]] for s in shards]
                   for name, shards in sorted(splits.items())},
    }
    blob = json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


@dataclass
class Manifest:
    root: str  # the dataset directory (absolute)
    seq_len: int
    sample_tokens: int
    dtype: np.dtype
    vocab_size: int
    eod_id: int
    fingerprint: str
    tokenizer_path: str  # absolute
    tokenizer_sha256: str
    source: Dict[str, Any] = field(default_factory=dict)
    created_by: str = "pretrain-data"
    split_infos: Dict[str, SplitInfo] = field(default_factory=dict, repr=False)

    @property
    def splits(self) -> List[str]:
        return list(self.split_infos)

    @property
    def path(self) -> str:
        return os.path.join(self.root, MANIFEST_NAME)

    def split(self, name: str) -> SplitInfo:
        if name not in self.split_infos:
            raise DataError(f"{self.path}: no split '{name}'; it has {self.splits}")
        return self.split_infos[name]

    @classmethod
    def load(cls, path_or_dir: Union[str, os.PathLike], check_files: bool = True) -> "Manifest":
        """Read and check `DIR/manifest.json` (or the manifest file itself). With `check_files`,
        every local shard must exist with the size the manifest records, and the tokenizer file
        must match its sha256."""
        path = os.path.abspath(os.fspath(path_or_dir))
        if os.path.isdir(path):
            path = os.path.join(path, MANIFEST_NAME)
        if not os.path.isfile(path):
            raise DataError(
                f"{path}: no manifest; run `pretrain-data --input ... --output "
                f"{os.path.dirname(path)}` (shards without a manifest are an incomplete write)")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: unreadable manifest ({e}); re-run pretrain-data") from e
        try:
            manifest = cls.from_dict(raw, os.path.dirname(path), where=path)
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a value of the wrong type
            raise DataError(f"{path}: malformed manifest ({type(e).__name__}: {e}); re-run "
                            "pretrain-data") from e
        if check_files:
            manifest.check_files()
        return manifest

    @classmethod
    def from_dict(cls, raw: Any, root: str, where: Optional[str] = None) -> "Manifest":
        where = where or os.path.join(root, MANIFEST_NAME)
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise DataError(f"{where}: format is {got!r}, expected {FORMAT!r}; re-create the "
                            "dataset with this version of pretrain-data")
        _require(raw, _TOP_KEYS, where)
        if raw["dtype"] not in DTYPES:
            raise DataError(f"{where}: dtype {raw['dtype']!r} is not one of {sorted(DTYPES)}")
        seq_len, sample_tokens = int(raw["seq_len"]), int(raw["sample_tokens"])
        if seq_len < 1 or sample_tokens != seq_len + 1:
            raise DataError(f"{where}: sample_tokens={sample_tokens} must be seq_len + 1 = "
                            f"{seq_len + 1}")
        root = os.path.abspath(root)
        splits = {name: _parse_split(name, s, root, sample_tokens, where)
                  for name, s in raw["splits"].items()}
        tok = raw["tokenizer"]
        _require(tok, ("file", "sha256"), f"{where} [tokenizer]")
        m = cls(root=root, seq_len=seq_len, sample_tokens=sample_tokens,
                dtype=DTYPES[raw["dtype"]], vocab_size=int(raw["vocab_size"]),
                eod_id=int(raw["eod_id"]), fingerprint=str(raw["fingerprint"]),
                tokenizer_path=os.path.join(root, tok["file"]), tokenizer_sha256=tok["sha256"],
                source=dict(raw.get("source") or {}),
                created_by=str(raw.get("created_by", "")), split_infos=splits)
        if not 0 <= m.eod_id < m.vocab_size:
            raise DataError(f"{where}: eod_id {m.eod_id} is outside the vocabulary {m.vocab_size}")
        if np.iinfo(m.dtype).max < m.vocab_size - 1:
            raise DataError(f"{where}: dtype {raw['dtype']} cannot hold vocab_size {m.vocab_size}")
        shards = {n: [s.to_dict() for s in sp.shards] for n, sp in splits.items()}
        want = compute_fingerprint(m.tokenizer_sha256, seq_len, raw["dtype"], shards)
        if want != m.fingerprint:
            raise DataError(f"{where}: fingerprint does not match its shards and tokenizer (edited "
                            "by hand?); re-run pretrain-data")
        return m

    def with_shard_urls(self, template: str) -> "Manifest":
        """A copy whose shards are opened at `template` with `{path}` replaced by each shard's
        path in the manifest, e.g. "pipe:aws s3 cp s3://bucket/web/{path} -" or
        "/mnt/fast/web/{path}": the manifest and tokenizer stay local, the shards live anywhere
        webdataset can open. In a `pipe:` command each path is shell-quoted, so that a shard's
        name is one word of the command and never runs. The fingerprint is unchanged (it covers
        paths, not locations)."""
        if "{path}" not in template:
            raise DataError(f"data.shards_url={template!r} must contain {{path}}")
        splits = {name: dataclasses.replace(sp, shards=[
            dataclasses.replace(sh, url=_shard_url(template, sh.path)) for sh in sp.shards])
            for name, sp in self.split_infos.items()}
        return dataclasses.replace(self, split_infos=splits)

    def select_shards(self, split: str, locations: Sequence[str], spec: str = "") -> "Manifest":
        """A copy whose `split` holds only the shards at `locations` (from `shardspec.expand`), each
        opened there, in manifest order. A location matches the shard whose manifest path it ends
        with (a word of a `pipe:` command counts), else the one with its file name. The
        fingerprint is recomputed: a subset is another dataset; all shards give the same one."""
        where = f"data.shards={spec!r}" if spec else "data.shards"
        info = self.split(split)
        chosen: Dict[int, str] = {}
        for loc in locations:
            i = _match_shard(loc, info.shards)
            if i is None:
                example = info.shards[0].path if info.shards else "?"
                raise DataError(f"{where}: {loc!r} is not a shard of the '{split}' split of "
                                f"{self.path} (its shards are named like {example!r}); select "
                                "shards of this dataset, or write a manifest for the others with "
                                "pretrain-data")
            if i in chosen:
                raise DataError(f"{where}: {loc!r} and {chosen[i]!r} are the same shard "
                                f"{info.shards[i].path!r}")
            chosen[i] = loc
        shards = [dataclasses.replace(info.shards[i], url=chosen[i]) for i in sorted(chosen)]
        picked = dataclasses.replace(info, shards=shards, samples=sum(s.samples for s in shards),
                                     tokens=sum(s.tokens for s in shards),
                                     dropped_tokens=info.dropped_tokens
                                     if len(shards) == len(info.shards) else 0)
        splits = dict(self.split_infos, **{split: picked})
        fp = compute_fingerprint(self.tokenizer_sha256, self.seq_len, _dtype_name(self.dtype),
                                 {n: [s.to_dict() for s in sp.shards] for n, sp in splits.items()})
        return dataclasses.replace(self, split_infos=splits, fingerprint=fp)

    def check_files(self) -> None:
        """Every local shard exists with the recorded size; the tokenizer matches its sha256."""
        if not os.path.isfile(self.tokenizer_path):
            raise DataError(f"{self.tokenizer_path}: tokenizer listed in {self.path} is missing; "
                            "re-run pretrain-data")
        if sha256_file(self.tokenizer_path) != self.tokenizer_sha256:
            raise DataError(f"{self.tokenizer_path}: sha256 differs from {self.path}; the "
                            "tokenizer was replaced, re-run pretrain-data")
        for split in self.split_infos.values():
            for s in split.shards:
                if is_remote(s.url):
                    continue
                try:
                    size = os.path.getsize(s.url)
                except OSError:
                    raise DataError(f"{s.url}: shard listed in {self.path} is missing; copy the "
                                    "whole dataset directory or re-run pretrain-data") from None
                if size != s.bytes:
                    raise DataError(f"{s.url}: {size} bytes on disk, {self.path} says {s.bytes} "
                                    "(truncated or rewritten); re-run pretrain-data")

    def to_dict(self) -> Dict[str, Any]:
        """The manifest.json form (paths as given, relative where written relative)."""
        return {
            "format": FORMAT,
            "seq_len": self.seq_len,
            "sample_tokens": self.sample_tokens,
            "dtype": _dtype_name(self.dtype),
            "vocab_size": self.vocab_size,
            "eod_id": self.eod_id,
            "tokenizer": {"file": os.path.relpath(self.tokenizer_path, self.root),
                          "sha256": self.tokenizer_sha256},
            "splits": {n: s.to_dict() for n, s in self.split_infos.items()},
            "source": dict(self.source),
            "fingerprint": self.fingerprint,
            "created_by": self.created_by,
        }


def decode_sample(payload: bytes, manifest: Manifest) -> np.ndarray:
    """The (sample_tokens,) token ids of one `.tokens` payload: a read-only view of `payload`
    in the manifest's dtype. Raises DataError on a wrong length or an id >= vocab_size."""
    want = manifest.sample_tokens * manifest.dtype.itemsize
    if len(payload) != want:
        raise DataError(f"sample of {len(payload)} bytes, expected {want} "
                        f"({manifest.sample_tokens} x {_dtype_name(manifest.dtype)}) for dataset "
                        f"{manifest.root}")
    tokens = np.frombuffer(payload, dtype=manifest.dtype)  # (sample_tokens,)
    top = int(tokens.max())
    if top >= manifest.vocab_size:
        raise DataError(f"sample holds token id {top} >= vocab_size {manifest.vocab_size} for "
                        f"dataset {manifest.root}; the shard is corrupt or from another tokenizer")
    return tokens


def _dtype_name(dtype: np.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[np.dtype(dtype)]


def _require(raw: Any, keys: Tuple[str, ...], where: str) -> None:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object, got {type(raw).__name__}")
    missing = [k for k in keys if k not in raw]
    if missing:
        raise DataError(f"{where}: missing keys {missing}; re-run pretrain-data")


def _shard_url(template: str, path: str) -> str:
    """`template` with `{path}` replaced by `path`, shell-quoted where the template is a command."""
    if not template.startswith("pipe:"):
        return template.replace("{path}", path)  # opened as a file or by argv, never by a shell
    quoted = shlex.quote(path)
    if quoted != path and not _outside_quotes(template, "{path}"):
        raise DataError(f"data.shards_url={template!r}: {{path}} stands inside quotes or after a "
                        f"backslash, where the shell-quoted shard path {quoted} would not be one "
                        "word; write {path} bare (each path is quoted for you), e.g. "
                        "\"pipe:aws s3 cp 's3://my bucket/web/'{path} -\"")
    return template.replace("{path}", quoted)


def _outside_quotes(command: str, word: str) -> bool:
    """Whether every `word` in a shell command stands outside quotes and escapes."""
    quote, i = "", 0
    while i < len(command):
        if command.startswith(word, i):
            if quote:
                return False
            i += len(word)
            continue
        c = command[i]
        if c == "\\" and quote != "'":
            if command.startswith(word, i + 1):
                return False
            i += 2  # the escaped character
            continue
        if c in "'\"" and quote in ("", c):
            quote = "" if quote else c
        i += 1
    return True


def _check_shard_path(path: str, where: str) -> None:
    """A shard path in a manifest must be a relative path inside the dataset directory."""
    why = ("a `pipe:` command" if path.startswith("pipe:") else
           "a URL" if is_remote(path) else
           "an absolute path" if os.path.isabs(path) else
           "a path that climbs out with `..`" if ".." in path.split("/") else
           "empty" if not path.strip("/") else None)
    if why:
        raise DataError(f"{where}: shard {path!r} is {why}; a manifest names its shards only by "
                        "their path under the dataset directory, and commands or locations from "
                        "a dataset file are never used. To read shards from elsewhere (a URL, a "
                        "command, another disk), keep the manifest's paths and set data.shards_url "
                        "(e.g. \"pipe:aws s3 cp s3://bucket/web/{path} -\") or data.shards in your "
                        "config")


def _match_shard(location: str, shards: Sequence[ShardInfo]) -> Optional[int]:
    """The index of the one shard `location` names (see Manifest.select_shards), or None."""
    words = location[len("pipe:"):].split() if location.startswith("pipe:") else [location]
    words = [w.replace(os.sep, "/") for w in words]
    for same in (lambda w, p: w == p or w.endswith("/" + p),  # by manifest path
                 lambda w, p: w.rsplit("/", 1)[-1] == p.rsplit("/", 1)[-1]):  # by file name
        hits = {i for w in words for i, s in enumerate(shards) if same(w, s.path)}
        if len(hits) == 1:
            return hits.pop()
        if len(hits) > 1:
            raise DataError(f"data.shards: {location!r} could be any of "
                            f"{[shards[i].path for i in sorted(hits)]}; give more of its path")
    return None


def _parse_split(name: str, raw: Any, root: str, sample_tokens: int, where: str) -> SplitInfo:
    _require(raw, _SPLIT_KEYS, f"{where} [splits.{name}]")
    shards = []
    for i, s in enumerate(raw["shards"]):
        _require(s, _SHARD_KEYS, f"{where} [splits.{name}.shards[{i}]]")
        path = str(s["path"])
        _check_shard_path(path, f"{where} [splits.{name}.shards[{i}]]")
        shard = ShardInfo(path=path, url=os.path.join(root, path), samples=int(s["samples"]),
                          tokens=int(s["tokens"]), bytes=int(s["bytes"]), sha256=str(s["sha256"]))
        if shard.tokens != shard.samples * sample_tokens:
            raise DataError(f"{where}: shard {path} has tokens={shard.tokens}, expected samples x "
                            f"sample_tokens = {shard.samples * sample_tokens}")
        shards.append(shard)
    split = SplitInfo(name=name, samples=int(raw["samples"]), tokens=int(raw["tokens"]),
                      shards=shards, dropped_tokens=int(raw.get("dropped_tokens", 0)))
    counted = sum(s.samples for s in shards)
    if split.samples != counted or split.tokens != split.samples * sample_tokens:
        raise DataError(f"{where}: split {name} totals (samples={split.samples}, tokens="
                        f"{split.tokens}) disagree with its shards; re-run pretrain-data")
    return split
