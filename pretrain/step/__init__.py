"""What one training step is: the step module (the Trainer decides *when*, this decides *what*).

`StepModule` (base.py) is the interface the loop, the callbacks and the checkpointer use: one
optimizer step over a step's micro-batches with a veto, the evaluation loss, the gradient norm,
the learning rate, and save/load of the engine's state. `DeepSpeedStep` (deepspeed_step.py) is
today's implementation, data + tensor parallel through DeepSpeed ZeRO 0-3; it and the files
beside it are the only code that touches DeepSpeed (its config, the megatron mpu adapter, the
patches to its private parts, the version they are written against). `PipelineStep`
(pipeline_step.py) is the second implementation: megatron-core's 1F1B schedule over this rank's
pipeline stage, the same engine reducing and updating.
"""

from pretrain.step.base import StepModule, StepResult

__all__ = ["StepModule", "StepResult", "build_step_module", "partitioned_construction"]


def build_step_module(model, cfg, dist, load_universal: bool = False) -> StepModule:
    """The step module for this run's layout: DeepSpeed's data + tensor parallel step, or with
    parallel.pp > 1 megatron's pipeline schedule around the same engine."""
    if dist.layout.pp > 1:
        from pretrain.step.pipeline_step import PipelineStep

        return PipelineStep(model, cfg, dist, load_universal)
    from pretrain.step.deepspeed_step import DeepSpeedStep

    return DeepSpeedStep(model, cfg, dist, load_universal)


def partitioned_construction(cfg, dist):
    """A context in which the model's modules are built already partitioned (ZeRO-3), or None."""
    from pretrain.step.deepspeed_engine import partitioned_construction as construction

    return construction(cfg, dist)
