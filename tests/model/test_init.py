"""pretrain/model/init.py: the same weights whatever the layout, with megatron-core's statistics,
built on the meta device so that a rank only ever allocates its own shard."""

import dataclasses

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.model.init import _RowDrawer, global_name, rule
from tests.helpers.ranks import run_on_ranks

GPT2 = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, seq_len=32,
                   max_position_embeddings=32)
LLAMA = dataclasses.replace(GPT2, normalization="RMSNorm", activation="swiglu",
                            position_embedding="rope", bias=False, tie_embeddings=False,
                            num_query_groups=2)
STYLES = {"gpt2": GPT2, "llama": LLAMA}
ROWS = 256  # padded vocabulary rows, divisible by every TP degree here


def test_global_names_count_layers_over_the_stages_and_tie_the_output_layer():
    assert global_name("decoder.layers.1.mlp.linear_fc1.weight", 4, False) == \
        "decoder.layers.5.mlp.linear_fc1.weight"
    assert global_name("gpt.decoder.layers.0.self_attention.linear_qkv.bias", 2, False) == \
        "gpt.decoder.layers.2.self_attention.linear_qkv.bias"
    assert global_name("decoder.final_layernorm.weight", 6, False) == "decoder.final_layernorm.weight"
    assert global_name("output_layer.weight", 6, True) == "embedding.word_embeddings.weight"
    assert global_name("output_layer.weight", 6, False) == "output_layer.weight"


def test_rules_are_megatrons_defaults_and_an_unknown_tensor_is_an_error():
    assert rule("decoder.layers.3.self_attention.linear_proj.weight", 0.02, 8) == ("normal", 0.005)
    assert rule("decoder.layers.3.mlp.linear_fc2.weight", 0.02, 8) == ("normal", 0.005)
    assert rule("decoder.layers.3.mlp.linear_fc1.weight", 0.02, 8) == ("normal", 0.02)
    assert rule("decoder.final_layernorm.weight", 0.02, 8) == ("ones", 0.0)
    assert rule("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", 0.02, 8)[0] == "ones"
    assert rule("decoder.layers.0.mlp.linear_fc1.bias", 0.02, 8)[0] == "zeros"
    with pytest.raises(ValueError, match="no initialisation rule.*router"):
        rule("decoder.layers.0.mlp.router.weight", 0.02, 8)


def _fill(t: torch.Tensor, tp: int, rank: int, dim: int, stride: int) -> None:
    row = _RowDrawer(tuple(t.shape), 3, "w", 0.02, tp, rank, dim, stride)
    for i in range(row.rows):
        t[i].copy_(row(i))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("tp", [2, 4])
def test_each_rank_draws_the_slice_megatron_splits_the_whole_tensor_into(tp, dim, stride):
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

    rows, cols = 16 * stride, 24
    full = torch.empty(rows, cols)
    _fill(full, 1, 0, dim, stride)  # the whole tensor, as TP=1 draws it
    assert float(full.std()) == pytest.approx(0.02, rel=0.2)
    size = (rows if dim == 0 else cols)
    for rank in range(tp):
        shape = [rows, cols]
        shape[dim] //= tp
        theirs, ours = torch.empty(shape), torch.empty(shape)
        _initialize_affine_weight_cpu(theirs, rows, cols, size // tp, dim,
                                      lambda w: w.copy_(full), stride=stride, rank=rank,
                                      world_size=tp, skip_set_tensor_parallel_attributes=True)
        _fill(ours, tp, rank, dim, stride)
        assert torch.equal(ours, theirs)


def _named(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _megatron_initialised(dist, cfg):
    """The same architecture initialised by megatron-core itself (on the CPU, not meta)."""
    from megatron.core.models.gpt import GPTModel

    from pretrain.model.gpt import transformer_config
    from pretrain.model.spec import layer_spec

    # Our config with megatron's default init methods (ours draw nothing: pretrain.model.init).
    config = dataclasses.replace(transformer_config(cfg, 1, "cpu"), init_method=None,
                                 output_layer_init_method=None, embedding_init_method=None)
    model = GPTModel(config=config,
                     transformer_layer_spec=layer_spec(cfg.normalization, False),
                     vocab_size=ROWS, max_sequence_length=cfg.max_positions,
                     share_embeddings_and_output_weights=cfg.tie_embeddings,
                     position_embedding_type="rope" if cfg.position_embedding == "rope"
                     else "learned_absolute")
    return _named(model)


def _ours(dist, cfg, init_seed=7):
    """This rank's stage/shard, with the global names and megatron's split attributes."""
    from megatron.core import parallel_state as ps

    from pretrain.model.gpt import GPT

    model = GPT(cfg, ROWS, dist.tp, "cpu", pp=dist.layout.pp, seed=init_seed)
    offset = model.layer_offset
    out = {}
    for name, p in model.gpt.named_parameters():
        gname = global_name(name, offset, tied=False)  # the tied copy is compared as its own name
        out[gname] = (p.detach().clone(), getattr(p, "tensor_model_parallel", False),
                      getattr(p, "partition_dim", 0), getattr(p, "partition_stride", 1))
    return {"tp_rank": ps.get_tensor_model_parallel_rank(), "params": out}


@pytest.mark.parametrize("style", sorted(STYLES))
def test_statistics_match_megatrons_own_initialisation(style):
    cfg = dataclasses.replace(STYLES[style], hidden_size=256, ffn_hidden_size=1024)
    theirs = run_on_ranks(1, _megatron_initialised, cfg)[0]
    ours = {n: t for n, (t, *_rest) in run_on_ranks(1, _ours, cfg)[0]["params"].items()}
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        o = ours[name]
        assert o.shape == t.shape, name
        if t.std() == 0:  # norms and biases: exactly megatron's constants
            assert torch.equal(o, t), name
        else:
            assert float(o.std()) == pytest.approx(float(t.std()), rel=0.05), name
            assert abs(float(o.mean())) < 0.1 * float(t.std()), name
    assert not torch.equal(ours["embedding.word_embeddings.weight"],
                           theirs["embedding.word_embeddings.weight"])


def _assemble(results):
    """The full tensors from every rank's shards (TP slices concatenated as megatron splits)."""
    full = {}
    by_name = {}
    for r in results:
        for name, (t, sharded, dim, stride) in r["params"].items():
            by_name.setdefault(name, {})[r["tp_rank"]] = (t, sharded, dim, stride)
    for name, parts in by_name.items():
        t, sharded, dim, stride = parts[0]
        tp = len(parts)
        if not sharded or tp == 1:
            full[name] = t
            continue
        chunks = [None] * (tp * stride)
        for rank, (piece, *_rest) in parts.items():
            for j, c in enumerate(torch.chunk(piece, stride, dim=dim)):
                chunks[rank + j * tp] = c
        full[name] = torch.cat(chunks, dim=dim)
    return full


@pytest.mark.slow
@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_layout_starts_from_the_same_weights(style):
    cfg = STYLES[style]
    reference = _assemble(run_on_ranks(1, _ours, cfg))
    for tp, pp in ((2, 1), (1, 2)):
        full = _assemble(run_on_ranks(2, _ours, cfg, tp=tp, pp=pp))
        if cfg.tie_embeddings and pp > 1:  # the last stage's copy of the tied embedding
            assert torch.equal(full.pop("output_layer.weight"),
                               reference["embedding.word_embeddings.weight"])
        assert sorted(full) == sorted(reference), (tp, pp)
        for name, t in reference.items():
            assert torch.equal(full[name], t), (tp, pp, name)
    other_seed = _assemble(run_on_ranks(1, _ours, cfg, init_seed=8))
    assert not torch.equal(other_seed["decoder.layers.0.mlp.linear_fc1.weight"],
                           reference["decoder.layers.0.mlp.linear_fc1.weight"])


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _start_measuring() -> int:
    """Make the resident set track live memory (glibc: blocks of 64 KiB and more mapped and
    unmapped on their own, what was freed returned), reset its peak; the current RSS in KiB."""
    import ctypes
    import gc

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD (also ends glibc's dynamic threshold)
    gc.collect()
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM, the peak resident set, to the current one
    return _status_kib("VmRSS")


def _build_and_measure(dist, cfg, rows):
    """(RSS growth at the peak of building this rank's GPT, its parameters' bytes) in bytes."""
    from pretrain.model.gpt import GPT

    before = _start_measuring()
    model = GPT(cfg, rows, dist.tp, "cpu", pp=dist.layout.pp)
    peak = _status_kib("VmHWM")
    shard = sum(p.numel() * p.element_size() for p in model.parameters())
    return (peak - before) * 1024, shard


@pytest.mark.slow
def test_a_rank_builds_only_its_shard():
    """TP2 x PP2: each rank's shard is about a quarter of the model; building it holds little
    more than the shard (the meta device, then pretrain.model.init drawing one row at a time;
    measured 114 MiB for a 104 MiB shard of a 400 MiB model), never the model."""
    cfg = dataclasses.replace(GPT2, num_layers=8, hidden_size=1024, num_attention_heads=8,
                              seq_len=64, max_position_embeddings=64)
    rows = 4096
    whole = 4 * (8 * 12 * 1024 ** 2 + rows * 1024)  # fp32 bytes of the model (layers + vocabulary)
    for growth, shard in run_on_ranks(4, _build_and_measure, cfg, rows, tp=2, pp=2, timeout=300):
        print(f"rank build: RSS growth {growth / 2**20:.0f} MiB, shard {shard / 2**20:.0f} MiB, model {whole / 2**20:.0f} MiB")
        assert shard < whole / 3.5
        assert growth < 1.25 * shard, (growth, shard, whole)


def _build_partitioned_and_measure(dist, cfg, rows, gather=False):
    """As _build_and_measure, built under ZeRO-3's zero.Init (pretrain.step): (RSS growth, this
    rank's partition bytes, the model's bytes, the model's weights gathered)."""
    import deepspeed

    from launch.config import compose_config
    from pretrain.layout import Layout
    from pretrain.model.gpt import GPT
    from pretrain.step import partitioned_construction

    run_cfg = compose_config(["experiment=debug", "parallel.zero_stage=3", "logger.mode=disabled"])
    dist = dist.with_layout(Layout.build(dist.world_size, tp=1, zero_stage=3, micro_batch_size=1,
                                         global_batch_size=None))
    before = _start_measuring()
    model = GPT(cfg, rows, 1, "cpu", partitioned=partitioned_construction(run_cfg, dist))
    peak = _status_kib("VmHWM")
    params = list(model.parameters())
    part = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params)
    whole = sum(p.ds_numel * 4 for p in params)
    weights = {}
    if gather:
        with deepspeed.zero.GatheredParameters(params):
            weights = {n: p.detach().clone() for n, p in model.gpt.named_parameters()}
    return (peak - before) * 1024, part, whole, weights


@pytest.mark.slow
def test_zero3_ranks_build_only_their_partition_with_the_same_weights():
    """ZeRO-3: each module's parameters are partitioned over data parallel as it is built
    (DeepSpeed's zero.Init), and each rank fills only its partition; gathered, the weights are
    the unpartitioned model's."""
    big = dataclasses.replace(GPT2, num_layers=8, hidden_size=1024, num_attention_heads=8,
                              seq_len=64, max_position_embeddings=64)
    for growth, part, whole, _ in run_on_ranks(4, _build_partitioned_and_measure, big, 4096,
                                               timeout=300):
        print(f"zero.Init build: RSS growth {growth / 2**20:.0f} MiB, partition "
              f"{part / 2**20:.0f} MiB, model {whole / 2**20:.0f} MiB")
        assert part < whole / 3.5
        # Each module is allocated whole before zero.Init partitions it (measured: 132 MiB for
        # a 100 MiB partition of a 401 MiB model).
        assert growth < 1.5 * part, (growth, part, whole)
    for style in sorted(STYLES):
        gathered = run_on_ranks(2, _build_partitioned_and_measure, STYLES[style], ROWS,
                                gather=True)[0][3]
        reference = _assemble(run_on_ranks(1, _ours, STYLES[style], init_seed=0))
        assert sorted(gathered) == sorted(reference)
        for name, t in reference.items():
            assert torch.equal(gathered[name], t), (style, name)
