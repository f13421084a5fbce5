"""pretrain-plan: parameter counts equal the built megatron-core models, model-state memory equals
what a real DeepSpeed engine allocates, and the CLI prints the plan or one `error:` line."""

import dataclasses
import itertools
import json
import math
import os

import pytest
import torch

from launch.config import compose_config
from launch.plan import main
from pretrain.config import ModelConfig, ParallelConfig
from pretrain.errors import ConfigError
from pretrain.plan import (GIB, STATE_BYTES, activation_bytes, count_params, make_plan,
                           model_states)
from tests.helpers.ranks import run_on_ranks
from tests.helpers.synthetic import indexed_samples, write_dataset

# Every option of ModelConfig that changes the parameter count, in every combination.
OPTIONS = dict(position_embedding=["learned", "rope"], normalization=["LayerNorm", "RMSNorm"],
               bias=[True, False], activation=["gelu_tanh", "swiglu"],
               tie_embeddings=[True, False], num_query_groups=[None, 2])
COMBOS = [dict(zip(OPTIONS, values)) for values in itertools.product(*OPTIONS.values())]


def tiny(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
                vocab_size=200, seq_len=16, max_position_embeddings=24)
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def dist():
    """A 1-rank gloo group with megatron's parallel state (needed to build the models)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from pretrain.dist import Dist

    started_here = not torch.distributed.is_initialized()
    d = Dist.from_env(ParallelConfig(tp=1, device="cpu"), env={}).initialize(seed=0)
    yield d
    if started_here:
        d.shutdown()


def built_count(model_cfg: ModelConfig, vocab_rows: int, tp: int = 1) -> int:
    from pretrain.model.gpt import GPT, count_parameters

    return count_parameters(GPT(model_cfg, vocab_rows, tp=tp, device_type="cpu"))


# ---- parameters ------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,published", [("gpt2-small", 124_439_808),
                                              ("gpt2-medium", 354_823_168),
                                              ("gpt2-large", 774_030_080),
                                              ("gpt2-xl", 1_557_611_200)])
def test_published_gpt2_counts(preset, published):
    m = compose_config([f"model={preset}"]).model
    assert count_params(m, 50257).total == published
    # Padding the vocabulary adds whole embedding rows and nothing else.
    assert count_params(m, 50304).total == published + (50304 - 50257) * m.hidden_size


def test_llama_1b_count():
    m = compose_config(["model=llama-1b"]).model
    p = count_params(m, 32000)
    assert p.total == 1_100_048_384  # TinyLlama-1.1B's published count
    assert p.position_embeddings == 0 and p.output_layer == p.word_embeddings


def test_counts_equal_built_models_in_every_combination(dist):
    for kw in COMBOS:
        m = tiny(**kw)
        rows = m.padded_vocab_size(1)
        assert count_params(m, rows).total == built_count(m, rows), kw


@pytest.mark.parametrize("preset,expected", [("gpt2-small", 124_439_808),
                                             ("gpt2-medium", 354_823_168)])
def test_gpt2_built_with_megatron(dist, preset, expected):
    cfg = compose_config([f"model={preset}", "model.make_vocab_size_divisible_by=1"])
    assert built_count(cfg.model, cfg.model.padded_vocab_size(1)) == expected


def _count_tp2_rank(dist) -> list:
    """On one of two ranks: the parameter count of every combination built at TP=2."""
    return [built_count(tiny(**kw), tiny(**kw).padded_vocab_size(2), tp=2) for kw in COMBOS]


@pytest.mark.slow
def test_per_tp_rank_counts_equal_built_tp2_models():
    """Column-parallel weights and biases split, row-parallel biases and norms replicated."""
    expected = [count_params(tiny(**kw), tiny(**kw).padded_vocab_size(2), tp=2).total
                for kw in COMBOS]
    assert run_on_ranks(2, _count_tp2_rank, tp=2) == [expected, expected]


def _count_pp2_stage(dist) -> list:
    """On one of two ranks (a pipeline stage of two): the stage's parameter count per combination."""
    from pretrain.model.gpt import GPT, count_parameters

    return [count_parameters(GPT(tiny(**kw), tiny(**kw).padded_vocab_size(1), tp=1,
                                 device_type="cpu", pp=2)) for kw in COMBOS]


@pytest.mark.slow
def test_per_stage_counts_equal_built_pipeline_stages():
    """The first stage holds the embeddings, the last the final norm and the head (tied: its own
    copy of the word table)."""
    from pretrain.plan_memory import stage_params

    expected = [[stage_params(tiny(**kw), tiny(**kw).padded_vocab_size(1), 1, 2, s).total
                 for kw in COMBOS] for s in (0, 1)]
    assert run_on_ranks(2, _count_pp2_stage, pp=2) == expected


# ---- memory ----------------------------------------------------------------------------------
def test_zero_partitioning_follows_the_paper():
    n, dp = 1_000_000, 8
    s = [model_states(n, "bf16", z, dp) for z in range(4)]
    assert [x.gpu / n for x in s] == [16, 4 + 12 / dp, 2 + 14 / dp, 16 / dp]
    fp32 = model_states(n, "fp32", 0, dp)
    assert (fp32.weights, fp32.grads, fp32.optimizer) == (4 * n, 4 * n, 8 * n)
    off = model_states(n, "bf16", 2, dp, offload=True)
    assert off.optimizer == 0 and off.optimizer_cpu == 12 * n / dp


def test_activations_are_korthikanti_without_the_attention_matrix():
    m = compose_config(["model=gpt2-small"]).model
    s, h, L, v = m.seq_len, m.hidden_size, m.num_layers, 50304
    for t in (1, 2, 4):
        a = activation_bytes(m, 2, t, "bf16", v)
        assert a.layers == pytest.approx(L * s * 2 * h * (10 + 24 / t))
        assert a.embeddings_and_head == pytest.approx(5 * s * 2 * h + 4 * s * 2 * v / t)
    bf16, fp32 = (activation_bytes(m, 2, 1, prec, v) for prec in ("bf16", "fp32"))
    assert fp32.layers == 2 * bf16.layers
    full = activation_bytes(dataclasses.replace(m, recompute="full"), 2, 1, "bf16", v)
    assert full.layers == pytest.approx(L * 2 * s * 2 * h)
    assert full.recompute_working == pytest.approx(s * 2 * h * 34)


def test_largest_micro_batch_is_the_boundary():
    p = make_plan(compose_config(["experiment=gpt2-124m", "cluster.gpu_memory_gb=24"]))
    z, best = p.zero_stage, p.max_micro_batch[p.zero_stage]
    assert p.gpu_bytes(z, best) <= p.usable_gib * GIB < p.gpu_bytes(z, best + 1)
    assert p.usable_gib == pytest.approx(24 * 0.9)
    assert p.fits == (p.micro_batch <= best) and not p.warnings


def _measure_engine(engine, tokens):
    """Bytes that are really allocated: module weights; gradients after backward (p.grad at
    ZeRO 0, DeepSpeed's averaged_gradients at ZeRO 1); base-optimizer state after the step, and
    the fp32 weights the base optimizer updates when they are not the module's own storage."""
    loss = engine(tokens)
    engine.backward(loss)
    params = list(engine.module.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    for group in getattr(engine.optimizer, "averaged_gradients", {}).values():
        grads += sum(g.numel() * g.element_size() for g in group if g is not None)
    engine.step()
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    states = sum(t.numel() * t.element_size() for st in base.state.values()
                 for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
    module_storage = {p.untyped_storage().data_ptr() for p in params}
    copies = sum(p.numel() * p.element_size() for g in base.param_groups for p in g["params"]
                 if p.untyped_storage().data_ptr() not in module_storage)
    weights = sum(p.numel() * p.element_size() for p in params)
    return weights, grads, states, copies


@pytest.mark.parametrize("precision,zero", [("fp32", 0), ("fp32", 1), ("bf16", 1)])
def test_model_states_match_a_real_deepspeed_engine(dist, precision, zero):
    from pretrain.step.deepspeed_engine import build_engine
    from pretrain.model.gpt import GPT

    cfg = compose_config(["experiment=debug", "model.vocab_size=256", "cluster.nodes=1",
                          "cluster.gpus_per_node=1", f"trainer.precision={precision}",
                          f"parallel.zero_stage={zero}"])
    plan = make_plan(cfg)
    engine = build_engine(GPT(cfg.model, plan.padded_vocab, tp=1, device_type="cpu"), cfg, dist)
    tokens = torch.randint(0, 256, (cfg.trainer.micro_batch_size, cfg.model.seq_len + 1))
    weights, grads, states, copies = _measure_engine(engine, tokens)

    planned, extra = plan.states[zero], plan.buffers[zero]
    w, g, o = STATE_BYTES[precision]
    n = plan.params.total
    assert weights == pytest.approx(planned.weights, rel=0.01)
    assert planned.weights == w * n
    assert grads == pytest.approx(planned.grads, rel=0.01)
    # The optimizer's fp32 weights: the paper's master copy in bf16 (part of its 12 bytes);
    # with fp32 at ZeRO 1 a copy DeepSpeed adds on top, which the plan lists as master_copy.
    assert states + copies == pytest.approx(planned.optimizer + extra.master_copy, rel=0.01)
    assert copies == pytest.approx(4 * n if (precision == "bf16" or zero >= 1) else 0, rel=0.01)
    total = weights + grads + states + copies
    assert total == pytest.approx(planned.gpu + extra.master_copy, rel=0.02)


# ---- vocabulary and the CLI ------------------------------------------------------------------
def test_vocabulary_from_the_dataset_manifest(tmp_path):
    data = write_dataset(tmp_path / "ds", indexed_samples(8, 128, 300), [8], vocab_size=300)
    p = make_plan(compose_config(["experiment=debug", f"data.path={data}",
                                  "cluster.gpus_per_node=1"]))
    assert p.vocab == 300 and p.padded_vocab == 384 and p.vocab_source.endswith("manifest.json")
    with pytest.raises(ConfigError, match="model.vocab_size"):
        make_plan(compose_config(["experiment=debug", "cluster.gpus_per_node=1"]))


def test_cli_table_and_json(capsys):
    assert main(["experiment=gpt2-124m", "cluster.nodes=1", "cluster.gpus_per_node=8"]) == 0
    out = capsys.readouterr().out
    assert "124,475,904" in out and "124,439,808" in out and "*1" in out
    assert main(["--json", "model=llama-1b", "parallel.zero_stage=3", "cluster.gpus_per_node=8",
                 "cluster.token_budget=1e9"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["params"]["total"] == 1_100_048_384 and plan["dp"] == 8 and plan["zero_stage"] == 3
    assert plan["steps"] == math.ceil(1e9 / plan["tokens_per_step"])
    assert plan["tokens_per_s_gpu"] * plan["flops_per_token"] == pytest.approx(0.4 * 989e12)


def test_cli_warns_when_the_micro_batch_does_not_fit(capsys):
    main(["model=gpt2-xl", "trainer.micro_batch_size=64", "cluster.gpus_per_node=1"])
    out = capsys.readouterr().out
    assert "WARNING: micro-batch 64 does NOT fit" in out and "model.recompute=full" in out


@pytest.mark.parametrize("overrides,message", [
    (["experiment=gpt2-124m", "parallel.tp=5"], "parallel.tp"),
    (["experiment=gpt2-124m", "cluster.gpus_per_node=3"], "trainer.global_batch_size"),
    (["model=tiny"], "model.vocab_size"),
    (["model.no_such_key=1"], "no_such_key"),
])
def test_cli_errors_are_one_line_and_exit_2(capsys, overrides, message):
    with pytest.raises(SystemExit) as e:
        main(overrides)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err and message in err


# ---- pipeline stages and the bubble ----------------------------------------------------------
def test_pipeline_bubble_and_recompute_slow_the_step():
    """1F1B with p stages and m micro-batches per step idles (p-1)/(m+p-1) of the step; full
    recompute adds one forward of the layers. The fullest stage is planned."""
    base = ["experiment=gpt-175b", "parallel.tp=8", "parallel.sequence_parallel=true"]
    flat = make_plan(compose_config(base))
    piped = make_plan(compose_config(base + ["parallel.pp=4"]))
    m, p = piped.grad_accum, 4
    assert (piped.dp, m) == (16, 1536 // 16)
    assert piped.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
    assert flat.bubble_fraction == 0
    per_gpu = flat.tokens_per_s_gpu * (1 - piped.bubble_fraction)
    assert piped.tokens_per_s_gpu == pytest.approx(per_gpu)
    assert [s.stage for s in piped.stages] == [0, 3] and piped.peak_stage == 0
    assert piped.gpu_bytes(1) == max(s.gpu_bytes(1, 1) for s in piped.stages)
    full = make_plan(compose_config(base + ["model.recompute=full"]))
    assert 1.30 < full.recompute_factor < 4 / 3 and full.step_s == pytest.approx(
        flat.step_s * full.recompute_factor)
    # The finding: built as a whole TP shard per rank, ZeRO-3 dies building the model;
    # built under zero.Init (what pretrain-train does at ZeRO-3) it starts.
    zero3_cfg = compose_config(base + ["parallel.zero_stage=3"])
    old_way = make_plan(zero3_cfg, construction="tp_shard")
    assert old_way.fits_training and not old_way.fits_startup
    assert "start-up does NOT fit" in " ".join(old_way.warnings) and not old_way.fits
    zero3 = make_plan(zero3_cfg)
    assert zero3.fits and zero3.startup().construction == "sharded"
    assert zero3.startup().gpu < old_way.startup().gpu / 10
    # ... but gathers its weights for every micro-batch: bound by the data-parallel traffic.
    # (3 x its shard per micro-batch, 24 of them, against 2 x per step at ZeRO-1: 36x.)
    assert zero3.comm_s == zero3.step_s and zero3.dp_traffic_bytes == pytest.approx(
        36 * flat.dp_traffic_bytes)
