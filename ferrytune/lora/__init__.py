"""LoRA adapters as forward hooks, multi-adapter packed routing, PEFT format IO.

Typical use (one adapter)::

    spec = LoraSpec(rank=8, alpha=16, target_modules=["q_proj", "v_proj"])
    targets = find_targets(model, spec)            # model may be on the meta device
    adapter = Adapter.create(targets, spec, seed=0, device="cuda")
    handle = attach(model, [adapter])              # forward hooks; handle.remove()
    ...train adapter.parameters()...
    save_peft(adapter, "out/adapter", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M", spec=spec)

Several adapters on one packed batch::

    router = Router()
    handle = attach(model, [a0, a1, a2], router=router)
    with router.route([(0, 0, 4), (1, 4, 6), (2, 6, 8)]):   # (adapter, row_start, row_end)
        loss = sum(per-job mean losses); loss.backward()

Sequences of several adapters end to end in one row (packing without padding): segments are
ranges of the flattened rows x positions tokens::

    with router.route([(0, 0, 37), (1, 37, 90)], tokens=input_ids.numel()): ...

See docs/lora.md for the math and the format.
"""

from ferrytune.lora._adapter import Adapter
from ferrytune.lora._hooks import LoraHandle, Router, Segment, attach
from ferrytune.lora._peft_io import load_peft, peft_key, save_peft
from ferrytune.lora._spec import LoraSpec, TargetInfo, find_targets

__all__ = [
    "Adapter",
    "LoraHandle",
    "LoraSpec",
    "Router",
    "Segment",
    "TargetInfo",
    "attach",
    "find_targets",
    "load_peft",
    "peft_key",
    "save_peft",
]
