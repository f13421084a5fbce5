"""A run starts with one line of ours about megatron-core's fallbacks, not the libraries' warnings
(pretrain/model/fallbacks.py); with PYTHONWARNINGS set, the warnings are the user's to see."""

import sys
import warnings

import pytest

from pretrain.model import fallbacks
from tests.launch_helpers import run_train, tiny_overrides

# One text of each kind that a start printed before: megatron-core's, and torch's (from DeepSpeed).
LIBRARY_TEXTS = ["Transformer Engine and Apex are not installed", "Apex is not installed",
                 "full scope is deprecated", "all_gather_into_tensor` is deprecated",
                 "reduce_scatter_tensor` is deprecated", "UserWarning", "FutureWarning"]
OUR_LINE = "megatron-core runs without Transformer Engine and Apex: its local linear layers"


@pytest.mark.slow
def test_a_start_says_our_line_once_and_no_library_warning(tiny_dataset, tmp_path):
    # Two ranks, ZeRO-3: DeepSpeed gathers and reduce-scatters across data-parallel ranks.
    proc = run_train(tiny_overrides(tiny_dataset, tmp_path / "run", steps=2,
                                    parallel__zero_stage=3), nproc=2)
    out = proc.stdout + proc.stderr
    assert [t for t in LIBRARY_TEXTS if t in out] == [], out[-6000:]
    assert out.count(OUR_LINE) == 1, out[-6000:]  # rank 0 only
    assert "set PYTHONWARNINGS=default to see the libraries' warnings" in out


@pytest.mark.slow
def test_pythonwarnings_shows_the_library_warnings(tiny_dataset, tmp_path):
    proc = run_train(tiny_overrides(tiny_dataset, tmp_path / "run", steps=2),
                     env={"PYTHONWARNINGS": "default"})
    out = proc.stdout + proc.stderr
    assert "UserWarning: Transformer Engine and Apex are not installed" in out
    assert "UserWarning: Apex is not installed. Falling back to Torch Norm" in out
    assert out.count(OUR_LINE) == 1 and "set PYTHONWARNINGS" not in out  # nothing was filtered


def _shown(message: str, category, module: str) -> bool:
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn_explicit(message, category, f"/{module.replace('.', '/')}.py", 1,
                               module=module, registry={})
    return bool(seen)


def test_filters_are_narrow_and_the_cpu_only_one_waits_for_the_device(monkeypatch):
    import pretrain.model.spec  # noqa: F401  (megatron-core imports here, under pytest's filters)

    monkeypatch.setattr(sys, "warnoptions", [])
    monkeypatch.setattr(fallbacks, "_silenced", False)
    with warnings.catch_warnings():  # the filters are restored after the test
        warnings.simplefilter("always")
        _check_filters()


def _check_filters() -> None:
    tp_hint = ("When using async grad allreduce it is recommended to set the environment "
               "variable CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup")
    gather = ("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
              "`torch.distributed.all_gather_single` instead.")
    assert fallbacks.silence_library_warnings()
    assert not _shown("Apex is not installed. Falling back to Torch Norm", UserWarning,
                      "megatron.core.models.backends")
    assert not _shown(gather, FutureWarning, "torch.distributed.c10d_logger")
    # The same text from elsewhere, another category, or another warning: still shown.
    assert _shown("Apex is not installed. Falling back to Torch Norm", UserWarning, "ours")
    assert _shown(gather, DeprecationWarning, "torch.distributed.c10d_logger")
    assert _shown("something else", UserWarning, "megatron.core.models.backends")
    assert _shown(tp_hint, UserWarning, "megatron.core.tensor_parallel.layers")
    fallbacks.log_fallbacks("LayerNorm", "cuda")  # a GPU run keeps megatron's CUDA advice
    assert _shown(tp_hint, UserWarning, "megatron.core.tensor_parallel.layers")
    fallbacks.log_fallbacks("LayerNorm", "cpu")
    assert not _shown(tp_hint, UserWarning, "megatron.core.tensor_parallel.layers")


def test_warnoptions_turn_the_filters_off(monkeypatch):
    monkeypatch.setattr(sys, "warnoptions", ["default"])  # PYTHONWARNINGS=default or -W default
    monkeypatch.setattr(fallbacks, "_silenced", False)
    with warnings.catch_warnings():
        before = list(warnings.filters)
        assert not fallbacks.silence_library_warnings() and warnings.filters == before
    assert "PYTHONWARNINGS" not in fallbacks.fallback_note("RMSNorm", "cpu")
    assert "torch's RMSNorm" in fallbacks.fallback_note("RMSNorm", "cpu")
