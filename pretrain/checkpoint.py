"""Atomic, discoverable checkpoints of the DeepSpeed engine plus everything else a run needs.

Layout of `RUN_DIR/checkpoints/`:
    step_00000100/            one committed checkpoint (DeepSpeed files, trainer.json, rng_*.pt,
                              config.yaml, tokenizer.json, COMMITTED)
    step_00000200.tmp/        a save in progress (or one that crashed): never loaded, removed at start
    latest                    the name of the newest committed checkpoint (replaced atomically)
    step_00000100.universal/  its DeepSpeed universal form, made when a resume runs at another
                              parallel layout (pretrain.reshard); removed with step_00000100/

A save writes into `<name>.tmp`; after every rank has finished (barrier), rank 0 writes FILES
(every file's size), the COMMITTED marker, renames the directory to `<name>` and replaces
`latest`. A crash at any point leaves the previous checkpoint as latest and loadable.

A committed checkpoint whose files no longer match FILES (truncated or lost later, e.g. by a full
disk or a bad copy) is damaged: resuming from the latest one falls back, with a warning, to the
newest intact checkpoint; naming a damaged one in trainer.resume_from is a CheckpointError.
The check reads sizes only, before any process group starts, so every rank picks the same one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from pretrain import faults
from pretrain.errors import CheckpointError

log = logging.getLogger(__name__)

MARKER = "COMMITTED"
FILES = "FILES"  # JSON {relative path: size in bytes} of every file of the checkpoint
LAYOUT = "layout.json"  # the parallel layout it was saved at (pretrain.reshard.Layout)
_NAME = re.compile(r"^step_(\d{8})$")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def committed(root: Path) -> List[Path]:
    """Committed checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / MARKER).exists()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def step_of(path: Path) -> int:
    return int(_NAME.match(Path(path).name).group(1))


UNIVERSAL = ".universal"


def universal_dir(step_dir: Path) -> Path:
    """Where the universal form of a step directory lives (a sibling, never inside it)."""
    return Path(step_dir).with_name(Path(step_dir).name + UNIVERSAL)


def file_sizes(path: Path) -> Dict[str, int]:
    """Sizes of a checkpoint's files. Each is opened (not just stat'ed) so that NFS revalidates
    the size of files other nodes wrote (close-to-open consistency)."""
    sizes = {}
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.name not in (FILES, MARKER):
            with open(f, "rb") as fh:
                sizes[str(f.relative_to(path))] = os.fstat(fh.fileno()).st_size
    return sizes


def damaged(path: Path) -> Optional[str]:
    """What is wrong with a committed checkpoint's files, or None if they are as saved."""
    listing = Path(path) / FILES
    if not listing.exists():
        return None  # saved before FILES existed: nothing to check against
    for name, size in json.loads(listing.read_text()).items():
        try:
            actual = (Path(path) / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, {size} were saved"
    return None


def find_latest(root: Path) -> Optional[Path]:
    """The newest intact committed checkpoint: the `latest` pointer's, else the newest one found.
    Damaged ones are passed over with a warning."""
    pointer = root / "latest"
    candidates = committed(root)[::-1]
    if pointer.exists():
        named = root / pointer.read_text().strip()
        if (named / MARKER).exists():
            candidates.insert(0, named)
        else:
            log.warning("checkpoint pointer %s names %s, which is not committed; scanning", pointer, named)
    for candidate in candidates:
        problem = damaged(candidate)
        if problem is None:
            return candidate
        log.warning("checkpoint %s is damaged (%s): falling back to an older one", candidate, problem)
    return None


def clean_stale(root: Path) -> None:
    """Remove saves that never committed, and universal forms whose checkpoint is gone (rank 0,
    before training starts)."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.endswith(".tmp") or (p.is_dir() and _NAME.match(p.name) and not (p / MARKER).exists()):
            log.warning("removing incomplete checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.endswith(UNIVERSAL) and not (root / p.name[:-len(UNIVERSAL)] / MARKER).exists():
            shutil.rmtree(p, ignore_errors=True)


def rng_state() -> Dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def reseed_value(seed: int, step: int) -> int:
    """The seed a resume reseeds from when the checkpoint holds no RNG state for this layout:
    a function of (trainer.seed, step) only, the same on every rank, because megatron needs the
    default generators equal across a TP group; Dist.seed offsets the TP tracker per TP rank."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0] % 2**31)


def _repair_optimizer(optimizer: torch.optim.Optimizer, decay: List[float]) -> None:
    """Undo two faults of DeepSpeed 0.19.8's ZeRO-3 universal load (harmless elsewhere): it gives
    every param group group 0's hyperparameters (biases and norms would be decayed), and one
    shared `step` tensor to every group's state, which Adam then advances once per group per
    step (wrong bias correction; the loss drifts ~1e-4 within a step)."""
    for group, wd in zip(optimizer.param_groups, decay):
        group["weight_decay"] = wd
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


@contextlib.contextmanager
def _model_file_read_once(engine, reuse: bool):
    """DeepSpeed's load_checkpoint reads the model-states file twice: first in
    SDLoaderBase.check_ckpt_list, only to compare its mp_world_size, then for real. On the
    tensor-parallel rank 0, whose real read is that same first file, the first read is handed back
    instead of reading it again (a resume of a large model reads gigabytes less per rank). Other
    ranks read another file for real: nothing is kept for them."""
    ce = getattr(engine, "checkpoint_engine", None)
    original = getattr(ce, "load", None)
    if not reuse or original is None:
        yield
        return
    first: Dict[str, Any] = {}
    calls = 0

    def load(path, *args, **kwargs):
        nonlocal calls
        calls += 1
        if str(path) in first:
            return first.pop(str(path))
        sd = original(path, *args, **kwargs)
        if calls == 1:  # check_ckpt_list's read
            first[str(path)] = sd
        return sd

    own = vars(ce).get("load")  # an instance attribute, if DeepSpeed ever sets one
    ce.load = load
    try:
        yield
    finally:
        if own is None:
            del ce.load  # the class's method again
        else:
            ce.load = own
        first.clear()


class Checkpointer:
    def __init__(self, root: Path, dist, keep_last: int = 3, seed: int = 0):
        self.root = Path(root)
        self.dist = dist
        self.keep_last = keep_last
        self.seed = seed

    def save(self, engine, step: int, client_state: Dict[str, Any],
             extra_files: Optional[Dict[str, Path]] = None) -> Path:
        """Collective: every rank calls it. Returns the committed directory."""
        name = step_name(step)
        tmp_tag = name + ".tmp"
        tmp = self.root / tmp_tag
        final = self.root / name
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        self.dist.barrier()
        error: Optional[BaseException] = None
        try:
            engine.save_checkpoint(str(self.root), tag=tmp_tag, client_state=client_state,
                                   save_latest=False)
            torch.save(rng_state(), tmp / f"rng_rank{self.dist.rank:05d}.pt")
            if faults.active("crash_in_save", step, self.dist.rank):
                raise faults.InjectedFault(f"injected failure after rank {self.dist.rank} wrote")
        except Exception as e:  # agreed on below, so that no rank commits a partial save
            error = e
        # The committed marker is written only once every rank's files are on disk.
        if self.dist.all_reduce_max(1.0 if error else 0.0) > 0:
            raise CheckpointError(
                f"saving {name} failed ({error or 'on another rank'}); the previous checkpoint "
                f"stays the latest and {tmp} is removed at the next start") from error
        self.dist.barrier()
        if self.dist.is_main:
            for dst, src in (extra_files or {}).items():
                shutil.copyfile(src, tmp / dst)
            _fsync_write(tmp / "trainer.json", json.dumps(client_state.get("trainer_state", {})))
            if "layout" in client_state:
                _fsync_write(tmp / LAYOUT, json.dumps(client_state["layout"]))
            shutil.rmtree(universal_dir(final), ignore_errors=True)  # made from the step replaced
            _fsync_write(tmp / FILES, json.dumps(file_sizes(tmp), indent=0))
            _fsync_write(tmp / MARKER, name)
            if final.exists():  # re-saving a step (e.g. after resume_from an older one)
                old = self.root / (name + ".replaced.tmp")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_write(self.root / "latest", name)
            self._prune(keep=final)
        self.dist.barrier()
        return final

    def _prune(self, keep: Path) -> None:
        found = committed(self.root)
        for old in found[:-self.keep_last]:
            if old != keep:
                shutil.rmtree(universal_dir(old), ignore_errors=True)
                shutil.rmtree(old, ignore_errors=True)

    def load(self, engine, path: Path, load_optimizer: bool = True) -> Dict[str, Any]:
        """Collective. Loads engine (model, optimizer, LR schedule) and this rank's RNG state;
        returns the client state saved with it. `path` may be a universal form (pretrain.reshard),
        for an engine built with "load_universal"."""
        path = Path(path)
        if not (path / MARKER).exists():
            raise CheckpointError(f"{path} has no {MARKER} marker: it is an incomplete save; "
                                  f"point trainer.resume_from at a committed checkpoint")
        base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer
        decay = [g["weight_decay"] for g in base.param_groups]
        try:
            with _model_file_read_once(engine, self.dist.tp_rank == 0):
                loaded, client = engine.load_checkpoint(
                    str(path.parent), tag=path.name, load_optimizer_states=load_optimizer,
                    load_lr_scheduler_states=load_optimizer, load_module_strict=True)
        except (RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
            raise CheckpointError(f"cannot load {path}: {e}") from e
        if loaded is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint files in {path}")
        _repair_optimizer(base, decay)
        self._load_rng(path)
        return client or {}

    def _load_rng(self, path: Path) -> None:
        """This rank's saved RNG state when the checkpoint was saved at this layout; otherwise
        (another TP/DP layout, a universal form) every generator is reseeded deterministically."""
        rng_file = path / f"rng_rank{self.dist.rank:05d}.pt"
        saved = json.loads((path / LAYOUT).read_text()) if (path / LAYOUT).exists() else {}
        now = (self.dist.tp, self.dist.dp)
        same = (saved.get("tp", now[0]), saved.get("dp", now[1])) == now
        if rng_file.exists() and same:
            set_rng_state(torch.load(rng_file, weights_only=False))
            return
        step = int(re.match(r"step_(\d+)", path.name).group(1))
        self.dist.seed(reseed_value(self.seed, step))
        if self.dist.is_main:
            log.warning("%s holds no RNG state for TP=%d x DP=%d: reseeded every generator "
                        "from (trainer.seed=%d, step=%d); dropout masks differ from a run that "
                        "was never resharded", path, self.dist.tp, self.dist.dp, self.seed, step)
