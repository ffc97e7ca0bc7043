"""First-order passes over a streamed, frozen base: forward in order, backward in reverse.

Each decoder layer runs inside :class:`_StreamedLayer`, an autograd function in
the spirit of reentrant activation checkpointing (Chen et al., 2016): the
forward runs the layer without autograd and keeps only its input; the backward
fetches the block again — the streamer prefetches in reverse order — recomputes
the layer with autograd on, back-propagates through it and releases the block.
So a block's weights are on the device only while that layer computes, and the
base is never written (blocks are released clean).

The adapters (``ferrytune.lora`` forward hooks) run inside the recompute and
receive their gradients there. The CPU (and CUDA) RNG state is saved at forward
and restored for the recompute, so dropout masks are identical.

The outer block (embedding, final norm, head) is held from the first forward of
a step to the end of its last backward: autograd needs the head's weight for the
backward of the logits.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ferrytune.engine._units import UnitInterceptor, cat_rows, row_factors, slice_rows
from ferrytune.models import OUTER, ModelLayout, ParamSpec, Unit, bind, logits_at
from ferrytune.offload import BlockStreamer


def step_order(layout: ModelLayout, num_micro: int, *, backward: bool = True,
               recompute: set[str] | None = None) -> list[str]:
    """Visiting order of a step: outer once, then per micro-batch the layers forward and, for
    backward, the recomputed ones (``recompute``; default all) in reverse."""
    layers = layout.layer_blocks
    again = [b for b in layers[::-1] if recompute is None or b in recompute] if backward else []
    return [OUTER] + (layers + again) * num_micro


class FOEngine:
    """Runs the HF model with every layer streamed and checkpointed."""

    def __init__(self, layout: ModelLayout, streamer: BlockStreamer, *, device: torch.device) -> None:
        self.layout = layout
        self.streamer = streamer
        self.device = torch.device(device)
        self.interceptor = UnitInterceptor(layout)
        self.interceptor.handler = self._call_unit
        self.interceptor.install()
        self._outer: torch.Tensor | None = None
        # Without autograd, units may run once per slice of ``chunk_rows`` rows, each slice
        # inside ``chunk_context(i)`` (zo on LoRA: one perturbed adapter per slice).
        self.chunk_rows: int | None = None
        self.chunk_context: Callable[[int], Any] | None = None
        # Layers whose weights stay put (device home, no working copy: the resident tier on CPU)
        # run under plain autograd like PEFT; only blocks that move are checkpointed and fetched
        # again for a recomputing backward.
        self.recompute = {b for b in layout.layer_blocks if not streamer.stays_resident(b)}

    # --------------------------------------------------------------- passes
    def begin_step(self, num_micro: int, *, backward: bool = True) -> None:
        self.streamer.start_pass(step_order(self.layout, num_micro, backward=backward, recompute=self.recompute))
        self._outer = self.streamer.acquire(OUTER)
        _bind_block(self.layout, OUTER, self._outer)

    def end_step(self, *, failed: bool = False) -> None:
        _bind_block(self.layout, OUTER, None)
        self._outer = None
        if failed:  # unwinding an error: report that one, not the pass left half done
            self.streamer.abort_pass()
            return
        self.streamer.release(OUTER, dirty=False)
        self.streamer.finish_pass()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits at ``positions``: (B, T) ids and mask, (B, L) positions -> (B, L, V)."""
        model = self.layout.model
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        idx = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return logits_at(model, torch.gather(hidden, 1, idx))

    # ------------------------------------------------------------- the unit
    def _call_unit(self, unit: Unit, orig: Callable, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # no backward: fetch, run (per slice), release
            return self._run_no_grad(unit, orig, args, kwargs)
        if unit.block_id == OUTER:
            return orig(*args, **kwargs)
        if unit.block_id not in self.recompute:  # resident weights: autograd keeps what it needs
            _bind_block(self.layout, unit.block_id, self.streamer.acquire(unit.block_id))
            try:
                return orig(*args, **kwargs)
            finally:
                _bind_block(self.layout, unit.block_id, None)
                self.streamer.release(unit.block_id, dirty=False)
        hidden, rest = args[0], args[1:]
        if not hidden.requires_grad:
            # The first layer's input comes from a frozen embedding; the adapters inside still
            # need a graph, so hand the function a leaf that requires grad (its grad is dropped).
            hidden = hidden.detach().requires_grad_(True)
        box: dict[str, Any] = {}
        main = _StreamedLayer.apply(self, unit, orig, rest, kwargs, box, hidden)
        extra = box.get("extra")
        return main if extra is None else (main, *extra)

    def _run_no_grad(self, unit: Unit, orig: Callable, args: tuple, kwargs: dict) -> Any:
        layer = unit.block_id != OUTER
        if layer:
            _bind_block(self.layout, unit.block_id, self.streamer.acquire(unit.block_id))
        try:
            if self.chunk_rows is None:
                return orig(*args, **kwargs)
            n_total = _rows(args)
            outs = []
            for i, start in enumerate(range(0, n_total, self.chunk_rows)):
                a, kw = slice_rows((args, kwargs), n_total, start, start + self.chunk_rows, row_factors(self.layout))
                with self.chunk_context(i):
                    outs.append(orig(*a, **kw))
            return cat_rows(outs, [self.chunk_rows] * len(outs))
        finally:
            if layer:
                _bind_block(self.layout, unit.block_id, None)
                self.streamer.release(unit.block_id, dirty=False)

    def run_layer(self, unit: Unit, orig: Callable, hidden: torch.Tensor, rest: tuple, kwargs: dict) -> Any:
        flat = self.streamer.acquire(unit.block_id)
        _bind_block(self.layout, unit.block_id, flat)
        try:
            return orig(hidden, *rest, **kwargs)
        finally:
            _bind_block(self.layout, unit.block_id, None)

    def close(self) -> None:
        self.interceptor.uninstall()


class _StreamedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, engine: FOEngine, unit: Unit, orig: Callable, rest: tuple, kwargs: dict,
                box: dict, hidden: torch.Tensor) -> torch.Tensor:
        ctx.engine, ctx.unit, ctx.orig, ctx.rest, ctx.kwargs = engine, unit, orig, rest, kwargs
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(engine.device) if engine.device.type == "cuda" else None
        with torch.no_grad():
            out = engine.run_layer(unit, orig, hidden, rest, kwargs)
        engine.streamer.release(unit.block_id, dirty=False)
        main, extra = (out[0], tuple(out[1:])) if isinstance(out, tuple) else (out, None)
        box["extra"] = extra
        ctx.save_for_backward(hidden)
        return main

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (hidden,) = ctx.saved_tensors
        engine: FOEngine = ctx.engine
        h = hidden.detach().requires_grad_(hidden.requires_grad)
        devices = [engine.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, engine.device)
            with torch.enable_grad():
                out = engine.run_layer(ctx.unit, ctx.orig, h, ctx.rest, ctx.kwargs)
                main = out[0] if isinstance(out, tuple) else out
                if main.requires_grad:
                    torch.autograd.backward(main, grad_out)
        engine.streamer.release(ctx.unit.block_id, dirty=False)
        return (None, None, None, None, None, None, h.grad if h.requires_grad else None)


def _bind_block(layout: ModelLayout, block_id: str, flat: torch.Tensor | None) -> None:
    for p in layout.blocks[block_id].params:
        bind(p, None if flat is None else _view(flat, p))


def _rows(args: tuple) -> int:
    first = args[0]
    return first.shape[0] if isinstance(first, torch.Tensor) else 1


def _view(flat: torch.Tensor, p: ParamSpec) -> torch.Tensor:
    return flat[p.offset: p.offset + p.numel].view(p.shape)
