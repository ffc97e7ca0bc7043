"""The engine: trainers over the streamed model, one per method, and what they are built from.

* ``build_runtime(cfg)`` (``_runtime.py``): layout -> plan -> an unopened streamer;
  ``build_base_runtime`` for a read-only base without a training config;
* ``ZOEngine`` (``_zo.py``): the ZO2-style pass (both perturbed forwards while a block is on
  the device), over the arithmetic of ``_zo_math.py``; ``FOEngine`` (``_fo.py``): a streamed
  forward and a backward that keeps each layer's activations or recomputes them, as the plan
  says, in micro-batch-major or layer-major order (``train.accumulation``);
  ``layer_activation_bytes`` / ``lora_activation_estimate`` / ``lora_runtime_args``
  (``_activations.py``): the planner's activation estimate and accumulation order;
* trainers on one step loop (``StepLoop``, ``_loop.py``): ``ZOTrainer``, ``LoraTrainer``,
  ``ZOLoraTrainer`` (MeZO on the adapter), and ``MultiLoraTrainer`` (packed jobs, the service's);
* the LoRA trainers' optimizers (``_optim.py``): ``build_optimizer`` (``train.optimizer``: AdamW,
  ``AdamMini``, ``SGDSaI``) and ``optimizer_state_bytes`` (their state size, for memory estimates);
* checkpoints (``_checkpoint.py``), metrics (``_metrics.py``), schedules (``_schedule.py``).
"""

from ferrytune.engine._activations import layer_activation_bytes, lora_activation_estimate, lora_runtime_args
from ferrytune.engine._checkpoint import STATE_NAME, list_checkpoints, read_state
from ferrytune.engine._fo import FOEngine
from ferrytune.engine._loop import RUN_FILES, StepLoop, StepResult, TrainResult
from ferrytune.engine._lora_trainer import LoraTrainer
from ferrytune.engine._multi_lora import CHECKPOINT_NAME, MultiLoraTrainer, Packer
from ferrytune.engine._optim import OPTIMIZERS, AdamMini, SGDSaI, build_optimizer, optimizer_state_bytes
from ferrytune.engine._runtime import Runtime, build_base_runtime, build_runtime, check_device, weights_from
from ferrytune.engine._schedule import lr_at
from ferrytune.engine._zo import ZOEngine
from ferrytune.engine._zo_lora_trainer import ZOLoraTrainer
from ferrytune.engine._zo_math import CHAIN, ZOHyper, active_blocks, zo_update_
from ferrytune.engine._zo_trainer import ZOTrainer


def trainer_class(cfg) -> type:
    """The trainer of ``cfg``'s method: ``zo`` (full model or ``zo.trainable: lora``) or ``lora``."""
    if cfg.method == "zo" and cfg.zo.trainable == "lora":
        return ZOLoraTrainer
    return ZOTrainer if cfg.method == "zo" else LoraTrainer


__all__ = [
    "AdamMini", "CHAIN", "CHECKPOINT_NAME", "FOEngine", "LoraTrainer", "MultiLoraTrainer", "OPTIMIZERS", "Packer",
    "RUN_FILES", "Runtime", "SGDSaI", "STATE_NAME", "StepLoop", "StepResult", "TrainResult", "ZOEngine", "ZOHyper",
    "ZOLoraTrainer", "ZOTrainer", "active_blocks", "build_base_runtime", "build_optimizer", "build_runtime",
    "check_device", "layer_activation_bytes", "list_checkpoints", "lora_activation_estimate", "lora_runtime_args", "lr_at",
    "optimizer_state_bytes", "read_state",
    "trainer_class", "weights_from", "zo_update_",
]
