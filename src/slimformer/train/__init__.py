"""The training engine: one loop for every step that trains (finetune, distill, gradual, l1, qat).

A training step supplies a `TrainTask` (what to optimise) and calls `train` (how):

```python
from slimformer.train.data import lm_data, classification_data   # -> TrainData
from slimformer.train.loop import train
from slimformer.train.task import TrainConfig, TrainTask

class MyTask(TrainTask):
    def prepare(self, model):            # once, before training (and before a resume is loaded):
        return model                      #   e.g. swap nn.Linear -> FakeQuantLinear; return the model to train
    def loss(self, model, batch):         # one micro-batch -> (scalar loss, {"name": float} to log)
        ...                               #   batch: dict of tensors ("input_ids", "attention_mask", "labels")
    def after_step(self, model, state):   # after each optimizer step (fixed masks are already re-applied);
        ...                               #   state.step (1-based), state.lr, state.masks (mutable dict)
    def finish(self, model):              # once, after training: -> (model, info dict for the report)
        return model, {}                  #   e.g. convert fake-quant modules into QuantLinear

model, info = train(model, MyTask(), data, TrainConfig(steps=100, lr=1e-4), checkpoint=folder, resume=False)
```

- Extra trainable modules (a hidden-state projection, a classification head, LSQ step sizes that
  live outside the model) go in `task.extras` (an `nn.ModuleDict`, empty by default): they are
  optimised with the model, wrapped by DDP/FSDP with it, checkpointed with it; `loss` reaches
  them as `self.extras[...]` (inside `loss`, use the `model` argument, not a stored reference:
  under DDP it is the replica being trained).
- Only parameters with `requires_grad=True` are trained: freeze in `prepare`.
- Distillation: `slimformer.train.distill.DistillTask(teacher, alpha=, temperature=, hidden_weight=,
  attention_weight=)` is a TrainTask computing the KD loss against a frozen teacher; a QAT task can
  subclass it and override `prepare`/`finish` only. Pure loss functions: `slimformer.train.losses`.
- Fixed sparsity: every exact zero in a linear weight at the start is kept at zero (gradients
  masked, weights re-multiplied after each step); `state.masks` ({parameter name: bool keep-mask})
  may be replaced by `after_step` (gradual pruning does).
- Data: fixed seed; global batch = batch_size x world size x grad_accum; each rank takes its own
  slice of the same global order (DistributedSampler-equivalent), so N processes compute the same
  step as 1 process with the same global batch.
- Distributed: under `torchrun` (WORLD_SIZE > 1) the process group is initialised (gloo on CPU,
  nccl on CUDA) and the model wrapped in DistributedDataParallel, or sharded with FSDP2
  (`fully_shard`, on CPU and CUDA) with `strategy: fsdp`: a copy of the model is sharded, and the
  caller's model receives the trained weights; an overridden `after_step` then gets a full CPU copy
  whose edits are written back to the shards (a gather per step).
  Only rank 0 writes checkpoints and files. `slimformer.train.dist` has `rank()`, `world_size()`,
  `is_main()`, `init_distributed()`.
- Checkpoints (with a folder, every `checkpoint_every` steps): weights (model + extras) and masks as
  safetensors, the optimizer state as optimizer.safetensors (its tensors) + optimizer.json (the rest,
  `slimformer.train.state_io`), nothing pickled; the data
  order and the dropout seed are functions of the step, so `resume=True` continues from the last
  checkpoint and reproduces the uninterrupted run's weights exactly.
- In a recipe, a step reaches the frozen uncompressed model as `ctx.teacher`, its data as
  `ctx.calib`, its checkpoint folder as `ctx.checkpoint` and `--resume` as `ctx.resume`. Register
  training steps with `stage="train"` (refused after a quantization step, like pruning).
"""
