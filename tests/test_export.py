"""pretrain-export: checkpoints written by the real trainer (TP=1 and 2, ZeRO 1 and 3, GPT-2- and
Llama-style) become Hugging Face models whose logits equal our model's, and a TP=2 checkpoint
merges to the weights of the same run trained at TP=1."""

import json
import os
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from launch.export import main
from pretrain.checkpoint import FILES, file_sizes
from pretrain.config import ParallelConfig
from pretrain.data.manifest import compute_fingerprint, sha256_file
from pretrain.errors import CheckpointError, ConfigError
from pretrain.export import (export, load_merged_state, merged_state, read_config,
                             resolve_checkpoint)
from tests.helpers.synthetic import indexed_samples, write_dataset
from tests.test_checkpoint_safety import plant
from tests.launch_helpers import run_train, tiny_overrides
from tokenizer.bpe import train_tokenizer

pytestmark = pytest.mark.slow

SEQ = 32
LLAMA = {"model.position_embedding": "rope", "model.normalization": "RMSNorm",
         "model.activation": "swiglu", "model.bias": "false", "model.tie_embeddings": "false",
         "model.num_query_groups": 2}
# name: (ranks, overrides). Pairs in SAME_RUN_AT_TP1 differ only in their parallel layout (same
# global batch, same padded vocabulary: 300 tokens -> 512 rows), so their weights agree.
CASES = {
    "gpt2_tp1_zero1": (1, {"model.make_vocab_size_divisible_by": 256}),
    "gpt2_tp2_zero0": (2, {"parallel.tp": 2, "parallel.zero_stage": 0}),
    "llama_tp2_zero1": (2, {**LLAMA, "parallel.tp": 2}),
    "llama_dp2_zero3": (2, {**LLAMA, "parallel.zero_stage": 3, "trainer.micro_batch_size": 1,
                            "model.make_vocab_size_divisible_by": 256}),
    # Pipeline stages: layers renamed to global numbers, the tied output layer's copy dropped.
    "gpt2_pp2_zero1": (2, {"parallel.pp": 2, "parallel.zero_stage": 1,
                           "model.make_vocab_size_divisible_by": 256}),
    "llama_pp2_zero1": (2, {**LLAMA, "parallel.pp": 2, "parallel.zero_stage": 1,
                            "trainer.micro_batch_size": 1, "trainer.global_batch_size": 2,
                            "model.make_vocab_size_divisible_by": 256}),
}
SAME_RUN_AT_TP1 = {"gpt2_tp2_zero0": "gpt2_tp1_zero1", "llama_tp2_zero1": "llama_dp2_zero3",
                   "gpt2_pp2_zero1": "gpt2_tp1_zero1", "llama_pp2_zero1": "llama_dp2_zero3"}
ARCH = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Synthetic shards with a real byte-level BPE tokenizer (300 tokens) in place of the dummy."""
    root = tmp_path_factory.mktemp("export_data")
    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()[:8000]
    tok = train_tokenizer([text], vocab_size=300)
    vocab = tok.get_vocab_size()
    write_dataset(root, indexed_samples(64, SEQ, vocab), [32, 32], vocab)
    tok.save(str(root / "tokenizer.json"))
    manifest = json.loads((root / "manifest.json").read_text())
    sha = sha256_file(str(root / "tokenizer.json"))
    manifest["tokenizer"]["sha256"] = sha
    manifest["fingerprint"] = compute_fingerprint(
        sha, SEQ, manifest["dtype"], {k: v["shards"] for k, v in manifest["splits"].items()})
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


class Runs:
    """One 3-step training run per case, made on first use and shared by the module's tests."""

    def __init__(self, dataset: Path, root: Path):
        self.dataset, self.root, self.done = dataset, root, {}

    def __getitem__(self, name: str) -> Path:
        if name not in self.done:
            nproc, extra = CASES[name]
            run = self.root / name
            overrides = {"model.seq_len": SEQ, "trainer.micro_batch_size": 2, **extra}
            run_train(tiny_overrides(self.dataset, run, steps=3,
                                     **{k.replace(".", "__"): v for k, v in overrides.items()}),
                      nproc=nproc)
            self.done[name] = run
        return self.done[name]


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory) -> Runs:
    return Runs(dataset, tmp_path_factory.mktemp("export_runs"))


@pytest.fixture(scope="module")
def megatron():
    """A world of one with megatron's TP=1 state, for building our GPT in this process."""
    from pretrain.dist import Dist

    saved = dict(os.environ)
    dist = Dist.from_env(ParallelConfig(tp=1, device="cpu"), env={}).initialize(seed=0)
    yield dist
    dist.shutdown()
    os.environ.clear()
    os.environ.update(saved)


def our_model(step_dir: Path):
    from pretrain.model.gpt import GPT

    cfg = read_config(step_dir)
    state = merged_state(step_dir, cfg)
    padded = state["gpt.embedding.word_embeddings.weight"].shape[0]
    model = GPT(cfg.model, padded, 1, "cpu").eval()
    load_merged_state(model, state)
    return model


def our_logits(step_dir: Path, tokens: torch.Tensor, model=None) -> torch.Tensor:
    model = model if model is not None else our_model(step_dir)
    b, s = tokens.shape
    positions = torch.arange(s).unsqueeze(0).expand(b, s)  # (b, s)
    with torch.no_grad():
        return model.gpt(tokens, positions, attention_mask=None)  # (b, s, padded)


@pytest.mark.parametrize("case", list(CASES))
def test_exported_model_has_our_logits(case, runs, megatron, tmp_path):
    from transformers import AutoModelForCausalLM

    run = runs[case]
    out = tmp_path / "hf"
    info = export(run, out)
    step_dir = resolve_checkpoint(run)
    assert info["step"] == 3 and info["source"] == str(step_dir.resolve())
    assert info["architecture"] == ARCH[case.split("_")[0]]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "export_info.json"):
        assert (out / name).exists(), name

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    vocab = info["vocab_size"]
    assert type(hf).__name__ == info["architecture"]
    assert hf.get_input_embeddings().weight.shape[0] == vocab < info["padded_vocab_size"]
    tokens = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(0))
    ours = our_logits(step_dir, tokens)  # (b, s, padded)
    with torch.no_grad():
        theirs = hf(tokens).logits  # (b, s, vocab)
    diff = (ours[..., :vocab] - theirs).abs().max().item()
    print(f"{case}: max |logit difference| {diff:.3g} (logits up to {theirs.abs().max():.3g})")
    assert diff < 1e-4

    # Greedy generation: the same tokens from both models.
    prompt, new = tokens[:1, :6], 6
    model, seq = our_model(step_dir), tokens[:1, :6]
    for _ in range(new):
        nxt = our_logits(step_dir, seq, model)[:, -1, :vocab].argmax(-1, keepdim=True)  # (1, 1)
        seq = torch.cat([seq, nxt], dim=1)
    with torch.no_grad():
        hf_seq = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=0)
    assert torch.equal(seq, hf_seq), (seq, hf_seq)


@pytest.mark.parametrize("tp2_case", list(SAME_RUN_AT_TP1))
def test_tp2_checkpoint_merges_to_the_tp1_weights(tp2_case, runs):
    """The logit test loads the merged state into both models, so a wrong TP merge would pass it;
    this compares against the same training run made without tensor parallelism."""
    tp2, tp1 = (resolve_checkpoint(runs[c]) for c in (tp2_case, SAME_RUN_AT_TP1[tp2_case]))
    merged, reference = merged_state(tp2, read_config(tp2)), merged_state(tp1, read_config(tp1))
    assert merged.keys() == reference.keys()
    for name, ref in reference.items():
        assert merged[name].shape == ref.shape, name
        # The two layouts train alike up to float rounding (seen: < 1e-4); a wrong merge moves
        # weights by ~0.1.
        diff = (merged[name] - ref).abs().max().item()
        print(f"{tp2_case} {name}: {diff:.3g}")
        np.testing.assert_allclose(merged[name].numpy(), ref.numpy(), atol=2e-3, err_msg=name)


def test_exported_tokenizer_encodes_like_the_original(runs, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    run = runs["gpt2_tp1_zero1"]
    export(run, tmp_path / "hf")
    original = Tokenizer.from_file(str(resolve_checkpoint(run) / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = ["def wrap(text, width=70):\n    return text", "  Ünïcödé — 日本語 tabs\tand\nlines ",
             "end of one document<|endoftext|>next", ""]
    for text in texts:
        assert hf(text)["input_ids"] == original.encode(text).ids, text
        assert hf.decode(hf(text)["input_ids"]) == text
    assert hf.eos_token == "<|endoftext|>"
    assert hf.eos_token_id == original.token_to_id("<|endoftext|>")


def test_cli_takes_a_run_its_checkpoints_or_a_step(runs, tmp_path, capsys):
    run = runs["gpt2_tp1_zero1"]
    step_dir = run / "checkpoints" / "step_00000003"
    assert resolve_checkpoint(run) == resolve_checkpoint(run / "checkpoints") == step_dir
    main([str(step_dir), str(tmp_path / "hf"), "--dtype", "bfloat16"])
    assert "GPT2LMHeadModel" in capsys.readouterr().out
    info = json.loads((tmp_path / "hf" / "export_info.json").read_text())
    assert info["config"]["model"]["activation"] == "gelu_tanh" and info["dtype"] == "bfloat16"
    with pytest.raises(SystemExit) as e:  # OUT_DIR now holds a model
        main([str(run), str(tmp_path / "hf")])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    main([str(run), str(tmp_path / "hf"), "--overwrite"])


def _copy_step(run: Path, dst: Path) -> Path:
    return Path(shutil.copytree(resolve_checkpoint(run), dst / "step_00000003", symlinks=True))


def test_uncommitted_checkpoint_is_refused(runs, tmp_path, capsys):
    step = _copy_step(runs["gpt2_tp1_zero1"], tmp_path)
    (step / "COMMITTED").unlink()
    with pytest.raises(SystemExit) as e:
        main([str(step), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: CheckpointError") and "COMMITTED" in err
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        export(tmp_path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_missing_tensor_parallel_shard_is_refused(runs, tmp_path):
    step = _copy_step(runs["gpt2_tp2_zero0"], tmp_path)
    (step / "mp_rank_01_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"damaged \(mp_rank_01_model_states.pt is missing"):
        export(step, tmp_path / "hf")
    (step / "FILES").unlink()  # as saved before FILES existed: found missing while reading
    with pytest.raises(CheckpointError, match="tensor-parallel rank 1"):
        export(step, tmp_path / "hf")
    (step / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        export(step, tmp_path / "hf")


def test_damaged_step_directory_is_refused(runs, tmp_path):
    step = _copy_step(runs["gpt2_tp1_zero1"], tmp_path)
    shard = step / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"is damaged \(zero_pp_rank_0_mp_rank_00_optim_"
                                              r"states.pt has 100 bytes, \d+ were saved\); export"):
        export(step, tmp_path / "hf")


# ZeRO 0: our own read of the model states; ZeRO 1: DeepSpeed's zero_to_fp32.
@pytest.mark.parametrize("case, name", [
    ("gpt2_tp2_zero0", "mp_rank_01_model_states.pt"),
    ("gpt2_tp1_zero1", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ("gpt2_tp1_zero1", "mp_rank_00_model_states.pt")])
def test_planted_pickle_is_refused(runs, tmp_path, capsys, case, name):
    step = _copy_step(runs[case], tmp_path)
    marker = tmp_path / "MARKER"
    plant(step, name, marker)  # FILES updated: the size check passes
    with pytest.raises(SystemExit) as e:
        main([str(step), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert not marker.exists(), "the planted pickle ran"
    assert e.value.code == 2 and err.startswith("error: CheckpointError"), err
    assert f"{name}: refused to unpickle GLOBAL getattr" in err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("change, named", [
    ({"normalization": "RMSNorm"}, "model.normalization='RMSNorm'"),
    ({"position_embedding": "rope", "activation": "gelu"}, "model.position_embedding='rope'"),
])
def test_unsupported_model_settings_are_named(runs, tmp_path, change, named):
    step = _copy_step(runs["gpt2_tp1_zero1"], tmp_path)
    cfg = yaml.safe_load((step / "config.yaml").read_text())
    cfg["model"].update(change)
    (step / "config.yaml").write_text(yaml.safe_dump(cfg))
    (step / FILES).write_text(json.dumps(file_sizes(step)))  # edited on purpose, not damaged
    with pytest.raises(CheckpointError, match="cannot be exported") as e:
        export(step, tmp_path / "hf")
    assert named in str(e.value)


def test_bad_dtype_is_a_config_error(runs, tmp_path):
    with pytest.raises(ConfigError, match="dtype"):
        export(runs["gpt2_tp1_zero1"], tmp_path / "hf", dtype="int8")
