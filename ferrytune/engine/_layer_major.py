"""A layer-major LoRA step (``train.accumulation: layer_major``; GreedySnake, arXiv:2512.17570).

Every micro-batch of the step passes a decoder layer while its block is on the device: forward
``L0`` for micro-batches ``0..M-1``, then ``L1``, ...; backward ``Ln-1`` for ``0..M-1``, then
``Ln-2``, ... So the base is read once per step for the forward and once for the backward
re-fetch, whatever ``M`` is (micro-batch-major order reads it ``M`` times).

The HF model's own ``forward`` still builds everything around the layers (embedding, masks,
position embeddings, final norm, head), in three phases per step:

1. **capture** (per micro-batch, no autograd): the model's forward runs up to its layers; every
   layer call is recorded ``(unit, args, kwargs)`` and returns its input unchanged, and the last
   one ends the forward. The first call's input is the micro-batch's embedding output.
2. **layers**, layer by layer, each micro-batch in turn (per-layer autograd): the layer runs on
   a leaf ``h.detach().requires_grad_()`` of the micro-batch's hidden state with the arguments
   its own forward built. Kept layers (``Plan.keep``) save their weights as references, as in
   micro-batch-major order (``FOEngine.saving``); recomputed ones keep only the input.
3. **head** (per micro-batch, autograd on): the model's forward runs again, its layers return the
   stored outputs (the last one as a leaf), the loss is back-propagated to that leaf; then the
   layers' backward runs in reverse, each micro-batch in turn, handing the input gradient to the
   layer below.

Packed rows (``data.packing``): each input carries its ``position_ids`` and no attention mask; the
model's forward builds the block-diagonal mask from them in the capture, and the recorded layer
kwargs carry it to every layer call. Routed-only MoE reads (``offload.routed_experts``): the
routing hook fetches each micro-batch's experts as the layer runs on it (``FOEngine._routing_hook``);
the experts routed to by any micro-batch are fetched again with the block for the backward.

Random numbers (dropout): each micro-batch has its own generator state, seeded by the trainer
before its capture, carried from layer to layer (restored before the micro-batch runs a layer,
saved after) and restored before its head; a recomputed layer restores the state it started
from. So every micro-batch draws the same masks as in micro-batch-major order. The arithmetic
of each (layer, micro-batch) forward and backward is the same, and the gradient of an adapter
tensor accumulates over micro-batches in the same order (0, 1, ...): the step equals
micro-batch-major bit for bit (tests/engine/test_lora_layer_major.py).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ferrytune.engine._fo import FOEngine, _bind_block
from ferrytune.errors import FerrytuneError
from ferrytune.models import Unit


class _CaptureDone(Exception):
    """Raised by the last layer call of a capture: the rest of the model's forward is not needed."""


def _split(out: Any) -> tuple[torch.Tensor, tuple | None]:
    return (out[0], tuple(out[1:])) if isinstance(out, tuple) else (out, None)


class _Rng:
    """The CPU generator's state and, on CUDA, the device's."""

    def __init__(self, device: torch.device) -> None:
        self.device = device if device.type == "cuda" else None

    def get(self) -> tuple:
        return torch.get_rng_state(), (torch.cuda.get_rng_state(self.device) if self.device else None)

    def set(self, state: tuple) -> None:
        torch.set_rng_state(state[0])
        if self.device is not None:
            torch.cuda.set_rng_state(state[1], self.device)


class LayerMajorStep:
    """Runs one layer-major forward and backward over ``len(inputs)`` micro-batches on ``engine``.

    ``inputs[i]``: (input_ids, attention_mask, loss_positions, position_ids) of micro-batch ``i`` on the
    device (packed rows: ``position_ids`` and no mask; otherwise ``position_ids`` is None);
    ``seed(i)`` seeds the global RNG for micro-batch ``i`` (as micro-batch-major order does before
    its forward); ``loss(i, logits)`` returns the scalar to back-propagate. The caller brackets it
    with ``engine.begin_step(M, layer_major=True)`` / ``end_step``."""

    def __init__(self, engine: FOEngine) -> None:
        self.engine = engine
        self.rng = _Rng(engine.device)

    def run(self, inputs: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]],
            seed: Callable[[int], None], loss: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
        eng = self.engine
        calls: list[list[tuple[Unit, Callable, tuple, dict]]] = []
        states: list[tuple] = []
        try:
            for i, (ids, mask, pos, pids) in enumerate(inputs):  # 1. capture
                seed(i)
                rec: list[tuple[Unit, Callable, tuple, dict]] = []
                eng.layer_calls = self._capturer(rec, len(eng.layout.layer_blocks))
                try:
                    with torch.no_grad():
                        eng.forward(ids, mask, pos, position_ids=pids)
                    raise FerrytuneError("layer-major step: the model's forward ended without running its last "
                                         "decoder layer; set train.accumulation: micro_major")
                except _CaptureDone:
                    pass
                if calls and [c[0].block_id for c in rec] != [c[0].block_id for c in calls[0]]:
                    raise FerrytuneError("layer-major step: micro-batches call the layers in different orders; "
                                         "set train.accumulation: micro_major")
                calls.append(rec)
                states.append(self.rng.get())
            eng.layer_calls = None
            saved, routed = self._forward_layers(calls, states)  # 2. layers
            grads = self._heads(inputs, calls, saved, states, loss)  # 3. head and loss
            self._backward_layers(calls, saved, grads, routed)
        finally:
            eng.layer_calls = None

    # ------------------------------------------------------------ phases
    @staticmethod
    def _capturer(rec: list, n_layers: int):
        def capture(unit: Unit, orig: Callable, args: tuple, kwargs: dict) -> Any:
            rec.append((unit, orig, args, kwargs))
            if len(rec) == n_layers:
                raise _CaptureDone
            return args[0]  # the layers are run later, layer by layer: pass the input on

        return capture

    def _forward_layers(self, calls: list, states: list) -> tuple[list[list[tuple]], list[set[int]]]:
        """Per layer call j and micro-batch i: ("keep", leaf, out, extra) or ("recompute", input, rng, out,
        extra); and per layer call the experts its micro-batches routed to (MoE, routed-only reads)."""
        eng, lay = self.engine, self.engine.layout
        m = len(calls)
        hidden = [calls[i][0][2][0] for i in range(m)]
        saved: list[list[tuple]] = []
        routed: list[set[int]] = []
        for j in range(len(calls[0])):
            b = calls[0][j][0].block_id
            flat = eng.streamer.acquire(b)
            _bind_block(lay, b, flat)
            eng._routed[b] = set()
            row = []
            try:
                for i in range(m):
                    unit, orig, args, kwargs = calls[i][j]
                    self.rng.set(states[i])
                    eng.layer_forwards[b] += 1
                    if b in eng.recompute:
                        start = states[i]
                        with torch.no_grad():
                            out = orig(hidden[i], *args[1:], **kwargs)
                        main, extra = _split(out)
                        row.append(("recompute", hidden[i], start, main, extra))
                    else:
                        leaf = hidden[i].detach().requires_grad_(True)
                        with torch.enable_grad(), eng.saving(b, flat):
                            out = orig(leaf, *args[1:], **kwargs)
                        main, extra = _split(out)
                        row.append(("keep", leaf, main, extra))
                    states[i] = self.rng.get()
                    hidden[i] = main.detach()
            finally:
                _bind_block(lay, b, None)
                eng.streamer.release(b, dirty=False)
                routed.append(eng._routed.pop(b, set()))
            saved.append(row)
        return saved, routed

    def _heads(self, inputs: list, calls: list, saved: list, states: list,
               loss: Callable[[int, torch.Tensor], torch.Tensor]) -> list[torch.Tensor | None]:
        """Per micro-batch: the model's forward with the layers' stored outputs, the loss, its backward;
        returns the gradient at the last layer's output of each."""
        eng, n = self.engine, len(calls[0])
        grads: list[torch.Tensor | None] = []
        for i, (ids, mask, pos, pids) in enumerate(inputs):
            *_, main, extra = saved[n - 1][i]
            top = main.detach().requires_grad_(True)
            count = [0]

            def replay(unit: Unit, orig: Callable, args: tuple, kwargs: dict, i=i) -> Any:
                j = count[0]
                count[0] += 1
                if j == n - 1:
                    self.rng.set(states[i])  # what follows the layers draws as in micro-batch-major order
                    out, ext = top, extra
                else:
                    *_, out, ext = saved[j][i]
                    out = out.detach()
                return out if ext is None else (out, *ext)

            eng.layer_calls = replay
            try:
                logits = eng.forward(ids, mask, pos, position_ids=pids)
            finally:
                eng.layer_calls = None
            loss(i, logits).backward()
            grads.append(top.grad)
        return grads

    def _backward_layers(self, calls: list, saved: list, grads: list, routed: list[set[int]]) -> None:
        eng = self.engine
        for j in range(len(calls[0]) - 1, -1, -1):
            b = calls[0][j][0].block_id
            flat = eng.streamer.acquire(b)
            eng._held[b] = flat
            try:
                # kept layers' saved weight references point into the experts their forwards used
                # (a recomputed layer's routing hook fetches them again as it reruns)
                eng.streamer.fetch_experts(b, routed[j])
                for i, g in enumerate(grads):
                    entry, saved[j][i] = saved[j][i], None  # the graph is freed as it is used
                    if g is None:
                        continue
                    if entry[0] == "keep":
                        _, leaf, main, _ = entry
                        if main.requires_grad:
                            torch.autograd.backward(main, g)
                        grads[i] = leaf.grad
                    else:
                        grads[i] = self._recompute_backward(b, flat, calls[i][j], entry, g)
            finally:
                del eng._held[b]
                eng.streamer.release(b, dirty=False)

    def _recompute_backward(self, b: str, flat: torch.Tensor, call: tuple, entry: tuple,
                            g: torch.Tensor) -> torch.Tensor | None:
        eng = self.engine
        unit, orig, args, kwargs = call
        _, hidden, start, _, _ = entry
        h = hidden.detach().requires_grad_(True)
        _bind_block(eng.layout, b, flat)
        try:
            with torch.random.fork_rng(devices=[eng.device] if eng.device.type == "cuda" else [], enabled=True):
                self.rng.set(start)
                with torch.enable_grad():
                    eng.layer_forwards[b] += 1
                    main, _ = _split(orig(h, *args[1:], **kwargs))
                    if main.requires_grad:
                        torch.autograd.backward(main, g)
        finally:
            _bind_block(eng.layout, b, None)
        return h.grad
