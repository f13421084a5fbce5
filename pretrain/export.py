"""A committed checkpoint as a Hugging Face model directory (`pretrain-export CHECKPOINT OUT`).

1. Gather: each tensor-parallel rank's full fp32 weights. DeepSpeed's zero_to_fp32 undoes ZeRO's
   data-parallel sharding (stages 1-3; on stage 3 the module weights in the model files are
   placeholders), but it does not know TP: it is run on a view holding one TP rank's files at a
   time. ZeRO 0 saves no optimizer shards; its module weights are the weights.
2. Merge the TP shards by megatron-core's layout into the TP=1 state dict of our `GPT`.
3. Rename and reshape into GPT2LMHeadModel or LlamaForCausalLM, drop the vocabulary padding rows,
   and write model, tokenizer and `export_info.json` with save_pretrained.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import yaml

from pretrain.checkpoint import MARKER, damaged, find_latest
from pretrain.safe_load import safe_load, weights_only_loads
from pretrain.config import Config, ModelConfig
from pretrain.errors import CheckpointError, ConfigError
from pretrain.model.init import global_name

State = Dict[str, torch.Tensor]

EOD_TOKEN = "<|endoftext|>"  # the end-of-document token of pretrain-data's tokenizers
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The settings each Hugging Face architecture computes exactly as megatron-core does.
GPT2_LAYOUT = {"position_embedding": "learned", "normalization": "LayerNorm", "bias": True,
               "tie_embeddings": True}
GPT2_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu"}  # ours -> HF activation_function
LLAMA_LAYOUT = {"position_embedding": "rope", "normalization": "RMSNorm", "activation": "swiglu",
                "bias": False}

# megatron-core's tensor-parallel layout (TP=1 names): column-parallel layers split their output
# rows (dim 0), row-parallel layers their input columns (dim 1); everything else (norms,
# row-parallel biases, position embeddings) is replicated on every TP rank.
_COLUMN_PARALLEL = re.compile(r"(word_embeddings|output_layer|linear_qkv|linear_fc1)\.(weight|bias)$")
_ROW_PARALLEL = re.compile(r"(linear_proj|linear_fc2)\.weight$")
# How a parameter is split over TP ranks, by name: one of these (shared with pretrain.reshard,
# which derives the same from megatron's parameter attributes and checks that the two agree).
ROW, COLUMN, GATED, REPLICATED = "row", "column", "gated", "replicated"
# TransformerEngine's spec fuses the pre-attention/pre-MLP norms into the next linear layer.
_TE_NAMES = {"self_attention.linear_qkv.layer_norm_": "input_layernorm.",
             "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm."}


# ---- finding and reading a checkpoint ---------------------------------------------------------
def resolve_checkpoint(path: os.PathLike) -> Path:
    """An intact committed step directory from a step dir, a run's `checkpoints/` dir (its latest)
    or a run dir."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory; pass a step_XXXXXXXX checkpoint, a "
                              f"run's checkpoints/ directory or a run directory")
    if (path / MARKER).exists():
        problem = damaged(path)
        if problem is not None:
            raise CheckpointError(f"{path} is damaged ({problem}); export another checkpoint, or "
                                  f"the run directory for its newest intact one")
        return path
    if path.name.startswith("step_"):
        raise CheckpointError(f"{path} is not a committed checkpoint (no {MARKER} marker): the save "
                              f"did not finish; export an earlier step_* directory")
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = find_latest(root)
    if latest is None:
        raise CheckpointError(f"{path}: no committed checkpoint (no step_*/{MARKER}) under {root}")
    return latest


def _require(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"{path} is missing: the checkpoint {path.parent} is incomplete")
    return path


def read_config(step_dir: Path) -> Config:
    raw = yaml.safe_load(_require(step_dir / "config.yaml").read_text())
    try:
        return Config.from_dict(raw)
    except ConfigError as e:
        raise CheckpointError(f"{step_dir / 'config.yaml'}: {e}") from e


def tokenizer_vocab(tokenizer_file: Path) -> Tuple[int, int]:
    """(vocabulary size, id of the end-of-document token)."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(_require(tokenizer_file)))
    except CheckpointError:
        raise
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise CheckpointError(f"{tokenizer_file}: not a tokenizers tokenizer.json ({e})") from e
    eod = tok.token_to_id(EOD_TOKEN)
    if eod is None:
        raise CheckpointError(f"{tokenizer_file} has no {EOD_TOKEN} token; it is not a "
                              f"pretrain-data tokenizer")
    return tok.get_vocab_size(), eod


def architecture(m: ModelConfig) -> str:
    """GPT2LMHeadModel or LlamaForCausalLM; CheckpointError naming the settings otherwise."""
    def mismatches(layout: Dict) -> List[str]:
        return [f"model.{k}={getattr(m, k)!r} (needs {v!r})" for k, v in layout.items()
                if getattr(m, k) != v]

    gpt2 = mismatches(GPT2_LAYOUT)
    if m.activation not in GPT2_ACTIVATIONS:
        gpt2.append(f"model.activation={m.activation!r} (needs 'gelu_tanh' or 'gelu')")
    if (m.num_query_groups or m.num_attention_heads) != m.num_attention_heads:
        gpt2.append(f"model.num_query_groups={m.num_query_groups} (needs none: multi-head)")
    llama = mismatches(LLAMA_LAYOUT)
    if not gpt2:
        return "GPT2LMHeadModel"
    if not llama:
        return "LlamaForCausalLM"
    name, near = ("GPT-2", gpt2) if len(gpt2) <= len(llama) else ("Llama", llama)
    raise CheckpointError(
        f"this model cannot be exported to Hugging Face: it is neither GPT-2-style nor "
        f"Llama-style; closest is {name}, which differs in: {', '.join(near)}")


# ---- gather and merge -------------------------------------------------------------------------
def _canonical(name: str) -> str:
    name = name.replace("_orig_mod.", "")  # torch.compile's wrapper
    for te, local in _TE_NAMES.items():
        name = name.replace(te, local)
    return name


def _rank_state(step_dir: Path, tp_rank: int) -> State:
    """One TP rank's full (data-parallel-unsharded) fp32 weights, megatron names."""
    pattern = f"*mp_rank_{tp_rank:02d}"
    model_files = sorted(step_dir.glob(f"{pattern}_model_states.pt"))
    optim_files = sorted(step_dir.glob(f"{pattern}_optim_states.pt"))
    if not model_files:
        raise CheckpointError(f"{step_dir}: no model states of tensor-parallel rank {tp_rank} "
                              f"({pattern}_model_states.pt); the checkpoint is incomplete")
    if not optim_files:  # ZeRO 0
        module = safe_load(model_files[0])["module"]
        state = {k: v for k, v in module.items() if torch.is_tensor(v)}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with tempfile.TemporaryDirectory() as view:
            tag_dir = Path(view) / step_dir.name
            tag_dir.mkdir()
            for f in model_files + optim_files:
                (tag_dir / f.name).symlink_to(f.resolve())
            chatter = io.StringIO()  # zero_to_fp32 prints progress bars and summaries
            try:
                with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), \
                        weights_only_loads():
                    state = get_fp32_state_dict_from_zero_checkpoint(view, tag=step_dir.name)
            except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
                raise CheckpointError(f"{step_dir}: cannot gather the weights of tensor-parallel "
                                      f"rank {tp_rank}: {e}") from e
    return {_canonical(k): v.detach().float() for k, v in state.items()
            if not k.endswith("._extra_state")}


def tp_split(name: str, swiglu: bool) -> str:
    """ROW: split on dim 1. COLUMN: split on dim 0. GATED: SwiGLU's fc1, two sub-parameters
    [gate; up] each split on dim 0 (a rank holds [gate_r; up_r]). REPLICATED: whole on every rank."""
    if _ROW_PARALLEL.search(name):
        return ROW
    if _COLUMN_PARALLEL.search(name):
        return GATED if swiglu and "linear_fc1" in name else COLUMN
    return REPLICATED


def merge_tensor_parallel(shards: List[State], swiglu: bool) -> State:
    """The TP=1 state dict from the TP ranks' state dicts (megatron-core's layout)."""
    names = list(shards[0])
    for r, shard in enumerate(shards[1:], 1):
        if set(shard) != set(names):
            raise CheckpointError(f"tensor-parallel ranks 0 and {r} hold different parameters "
                                  f"({sorted(set(shard) ^ set(names))[:4]}...)")
    merged = {}
    for name in names:
        parts = [s[name] for s in shards]
        split = tp_split(name, swiglu)
        if len(parts) == 1:
            merged[name] = parts[0]
        elif split == ROW:
            merged[name] = torch.cat(parts, dim=1)
        elif split == GATED:
            # Each rank holds [gate_r; up_r]; the TP=1 layout is [gate_0 .. gate_n; up_0 .. up_n].
            gates, ups = zip(*(p.chunk(2, dim=0) for p in parts))
            merged[name] = torch.cat(gates + ups, dim=0)
        elif split == COLUMN:
            # linear_qkv holds whole query groups per rank, so plain concatenation keeps
            # megatron's per-group [q heads, k, v] interleaving.
            merged[name] = torch.cat(parts, dim=0)
        else:
            if any(p.shape != parts[0].shape for p in parts):
                raise CheckpointError(f"{name}: shapes {[tuple(p.shape) for p in parts]} differ "
                                      f"across TP ranks and its parallel layout is unknown")
            merged[name] = parts[0]
    return merged


def merged_state(step_dir: Path, cfg: Config) -> State:
    """Our GPT's full fp32 state dict (TP=1 names and layout, vocabulary still padded).

    With pipeline parallelism each stage's files hold its layers numbered from 0 (model-parallel
    rank = tp_rank + tp x pp_rank): the stages are merged over TP one by one, their layers renamed
    to global numbers, and the last stage's copy of a tied embedding dropped."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    swiglu = cfg.model.activation == "swiglu"
    per_stage = cfg.model.num_layers // pp
    merged: State = {}
    for stage in range(pp):
        shards = [_rank_state(step_dir, stage * tp + r) for r in range(tp)]
        for name, t in merge_tensor_parallel(shards, swiglu).items():
            if pp > 1 and stage > 0 and cfg.model.tie_embeddings and "output_layer." in name:
                continue  # the first stage's word embedding is the same tensor
            gname = global_name(name, stage * per_stage, tied=False)
            if gname in merged:
                raise CheckpointError(f"{step_dir}: pipeline stages hold {gname} twice; the "
                                      f"checkpoint does not match parallel.pp={pp}")
            merged[gname] = t
    return merged


def load_merged_state(model: torch.nn.Module, state: State) -> None:
    """Load a merged state into a TP=1 `GPT` whose vocabulary rows equal the state's."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("._extra_state")]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"state does not fit the model: missing {missing}, "
                              f"unexpected {result.unexpected_keys}")


# ---- to Hugging Face names and layouts --------------------------------------------------------
def _split_qkv(t: torch.Tensor, m: ModelConfig) -> Tuple[torch.Tensor, ...]:
    """megatron's linear_qkv rows, per query group [q heads of the group, k, v], as q, k, v."""
    heads = m.num_attention_heads
    groups = m.num_query_groups or heads
    d = m.hidden_size // heads
    per = heads // groups
    rest = t.shape[1:]  # (hidden,) for the weight, () for the bias
    x = t.reshape(groups, per + 2, d, *rest)  # (g, per+2, d, [h])
    q = x[:, :per].reshape(heads * d, *rest)  # (heads*d, [h])
    k = x[:, per].reshape(groups * d, *rest)  # (g*d, [h])
    v = x[:, per + 1].reshape(groups * d, *rest)
    return q, k, v


def _taker(state: State) -> Tuple[Callable[[str], torch.Tensor], Callable[[], None]]:
    """take(name) pops a tensor; done() fails if any were left over (a mapping gap)."""
    left = dict(state)

    def take(name: str) -> torch.Tensor:
        if name not in left:
            raise CheckpointError(f"the checkpoint has no {name}; it does not match its config.yaml")
        return left.pop(name)

    def done() -> None:
        if left:
            raise CheckpointError(f"parameters not exported: {sorted(left)}")

    return take, done


def gpt2_state(m: ModelConfig, state: State, vocab: int) -> State:
    take, done = _taker(state)
    out = {"transformer.wte.weight": take("gpt.embedding.word_embeddings.weight")[:vocab],
           "transformer.wpe.weight": take("gpt.embedding.position_embeddings.weight")}
    for i in range(m.num_layers):
        src, dst = f"gpt.decoder.layers.{i}.", f"transformer.h.{i}."
        # HF GPT-2's Conv1D stores weights (in, out): the transpose of nn.Linear's.
        out[dst + "attn.c_attn.weight"] = torch.cat(
            _split_qkv(take(src + "self_attention.linear_qkv.weight"), m)).t()
        out[dst + "attn.c_attn.bias"] = torch.cat(
            _split_qkv(take(src + "self_attention.linear_qkv.bias"), m))
        for ours, theirs in (("self_attention.linear_proj", "attn.c_proj"),
                             ("mlp.linear_fc1", "mlp.c_fc"), ("mlp.linear_fc2", "mlp.c_proj")):
            out[f"{dst}{theirs}.weight"] = take(f"{src}{ours}.weight").t()
            out[f"{dst}{theirs}.bias"] = take(f"{src}{ours}.bias")
        for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
            for p in ("weight", "bias"):
                out[f"{dst}{theirs}.{p}"] = take(f"{src}{ours}.{p}")
    for p in ("weight", "bias"):
        out[f"transformer.ln_f.{p}"] = take(f"gpt.decoder.final_layernorm.{p}")
    out["lm_head.weight"] = out["transformer.wte.weight"]  # tied
    done()
    return {k: v.contiguous() for k, v in out.items()}


def llama_state(m: ModelConfig, state: State, vocab: int) -> State:
    # megatron's RoPE (rotary_interleaved=False) rotates halves of each head like HF's
    # rotate_half, with the same frequencies: q and k rows need no permutation.
    take, done = _taker(state)
    out = {"model.embed_tokens.weight": take("gpt.embedding.word_embeddings.weight")[:vocab]}
    for i in range(m.num_layers):
        src, dst = f"gpt.decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = _split_qkv(take(src + "self_attention.linear_qkv.weight"), m)
        out.update({dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
                    dst + "self_attn.v_proj.weight": v})
        out[dst + "self_attn.o_proj.weight"] = take(src + "self_attention.linear_proj.weight")
        gate, up = take(src + "mlp.linear_fc1.weight").chunk(2, dim=0)  # SwiGLU: [gate; up]
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
        out[dst + "mlp.down_proj.weight"] = take(src + "mlp.linear_fc2.weight")
        out[dst + "input_layernorm.weight"] = take(src + "input_layernorm.weight")
        out[dst + "post_attention_layernorm.weight"] = take(src + "pre_mlp_layernorm.weight")
    out["model.norm.weight"] = take("gpt.decoder.final_layernorm.weight")
    if m.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    else:
        out["lm_head.weight"] = take("gpt.output_layer.weight")[:vocab]
    done()
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(m: ModelConfig, arch: str, vocab: int, eod: int):
    from transformers import GPT2Config, LlamaConfig

    if arch == "GPT2LMHeadModel":
        return GPT2Config(
            vocab_size=vocab, n_positions=m.max_positions, n_embd=m.hidden_size,
            n_layer=m.num_layers, n_head=m.num_attention_heads, n_inner=m.ffn_size,
            activation_function=GPT2_ACTIVATIONS[m.activation], layer_norm_epsilon=m.norm_epsilon,
            resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.attention_dropout,
            initializer_range=m.init_std, bos_token_id=eod, eos_token_id=eod,
            tie_word_embeddings=True, architectures=[arch])
    return LlamaConfig(
        vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.ffn_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        head_dim=m.hidden_size // m.num_attention_heads, hidden_act="silu",
        max_position_embeddings=m.max_positions, rms_norm_eps=m.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)},
        tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False,
        attention_dropout=m.attention_dropout, initializer_range=m.init_std,
        bos_token_id=eod, eos_token_id=eod, architectures=[arch])


# ---- the export -------------------------------------------------------------------------------
def export(checkpoint: os.PathLike, out_dir: os.PathLike, dtype: str = "float32",
           overwrite: bool = False) -> Dict:
    """Write the Hugging Face model of a committed checkpoint to out_dir; returns export_info."""
    import transformers

    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; pick a new directory or pass --overwrite")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    step_dir = resolve_checkpoint(checkpoint)
    cfg = read_config(step_dir)
    arch = architecture(cfg.model)
    tokenizer_file = step_dir / "tokenizer.json"
    vocab, eod = tokenizer_vocab(tokenizer_file)
    state = merged_state(step_dir, cfg)
    padded = state["gpt.embedding.word_embeddings.weight"].shape[0]
    if vocab > padded:
        raise CheckpointError(f"{tokenizer_file} has {vocab} tokens but the model only {padded} "
                              f"embedding rows: the tokenizer is not the one it was trained with")
    to_hf = gpt2_state if arch == "GPT2LMHeadModel" else llama_state
    hf_state = to_hf(cfg.model, state, vocab)

    model = getattr(transformers, arch)(hf_config(cfg.model, arch, vocab, eod))
    model.load_state_dict(hf_state, strict=True)
    model.to(DTYPES[dtype]).eval()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file), eos_token=EOD_TOKEN, bos_token=EOD_TOKEN,
        unk_token=EOD_TOKEN, model_max_length=cfg.model.max_positions)
    info = {"source": str(step_dir.resolve()), "step": int(step_dir.name.split("_")[-1]),
            "architecture": arch, "vocab_size": vocab, "padded_vocab_size": padded,
            "saved_tensor_parallel": cfg.parallel.tp, "saved_zero_stage": cfg.parallel.zero_stage,
            "dtype": dtype, "config": cfg.to_dict()}

    # Written beside the target and renamed into place: a failed export leaves no half directory.
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(tmp)
    (tmp / "export_info.json").write_text(json.dumps(info, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return info
