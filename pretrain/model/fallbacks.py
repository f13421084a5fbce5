"""What megatron-core runs without Transformer Engine and Apex, said once in our words.

megatron-core warns, module by module at import, that Transformer Engine and Apex are missing, and
DeepSpeed's ZeRO calls torch collectives under names torch 2.13 deprecates: a wall of expected
warnings on every rank before a run's first line. `silence_library_warnings` (at the entry points)
turns exactly those off, unless the user asked for warnings (PYTHONWARNINGS or -W: then nothing
is filtered); `log_fallbacks` logs the one line that replaces them. megatron-core 0.16 emits all of
them through `warnings.warn`, none through `logging`.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Optional

# (category, message, module): each a regex that `warnings.filterwarnings` matches at the start.
_EXPECTED = [
    (UserWarning, r"Transformer Engine and Apex are not installed", r"megatron\.core"),
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm", r"megatron\.core"),
    # DeepSpeed 0.19's ZeRO gathers and reduce-scatters through these names.
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                    r"deprecated", r"torch\.distributed"),
]
# megatron's tensor-parallel layers advise a CUDA stream setting: meaningless on CPU, kept on GPU.
_CPU_ONLY = [(UserWarning, r"When using .* CUDA_DEVICE_MAX_CONNECTIONS", r"megatron\.core")]

_silenced = False


def silence_library_warnings() -> bool:
    """Filter the expected warnings above; call before megatron-core is imported. Does nothing when
    the user set PYTHONWARNINGS or -W (sys.warnoptions). Returns whether the filters are on."""
    global _silenced
    if sys.warnoptions:
        return False
    for category, message, module in _EXPECTED:
        warnings.filterwarnings("ignore", message, category, module)
    _silenced = True
    return True


def fallback_note(normalization: str, device_type: str) -> Optional[str]:
    """The line that replaces megatron-core's warnings: which of its layers run here and why.
    None when Transformer Engine's layers run (CUDA with Transformer Engine installed)."""
    from megatron.core.models.backends import HAVE_APEX

    from pretrain.model.spec import transformer_engine_available

    te = transformer_engine_available()
    if te and device_type == "cuda":
        return None
    found = {"Transformer Engine": te, "Apex": HAVE_APEX}
    missing = " and ".join(name for name, ok in found.items() if not ok)
    norm = ("Apex's fused LayerNorm" if HAVE_APEX and normalization == "LayerNorm"
            else f"torch's {normalization}")
    line = (f"megatron-core runs {f'without {missing}' if missing else 'on CPU'}: its local "
            f"linear layers, attention through torch SDPA, {norm}; the optimizer and gradient "
            f"clipping are torch's and DeepSpeed's, which need neither")
    if _silenced:
        line += " (set PYTHONWARNINGS=default to see the libraries' warnings)"
    return line


def log_fallbacks(normalization: str, device_type: str) -> None:
    """Log fallback_note through the "pretrain" logger (rank 0 only, as setup_logging sets it);
    with the filters on and on CPU, also filter the CPU-only warnings (they come at first use)."""
    if _silenced and device_type == "cpu":
        for category, message, module in _CPU_ONLY:
            warnings.filterwarnings("ignore", message, category, module)
    note = fallback_note(normalization, device_type)
    if note:
        logging.getLogger(__name__).info(note)
