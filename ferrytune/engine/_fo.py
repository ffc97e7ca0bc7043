"""First-order passes over a streamed, frozen base: forward in order, backward in reverse.

The plan (``Plan.keep``) says, per decoder layer, whether backward keeps its activations or
recomputes them; either way a block's weights are on the device only while that layer
computes, and the base is never written (blocks are released clean).

* **kept** (:class:`_KeptLayer`, ZeRO-Infinity's scheme): the layer runs once, with autograd
  on, and its graph is kept. Every tensor autograd saves that aliases the block's working
  buffer (a frozen weight, saved for the input-gradient of a linear) leaves the saved tensors
  as a :class:`WeightRef` — (block, offset, shape, stride) — through
  ``torch.autograd.graph.saved_tensors_hooks``; the slot is free for the next block at once.
  In backward the streamer has fetched the block again (reverse order), the references are
  unpacked as views of that fresh working copy, the layer's graph is back-propagated, and the
  block is released. One forward per layer per micro-batch.
* **recomputed** (:class:`_StreamedLayer`, reentrant checkpointing, Chen et al. 2016): the
  forward runs without autograd and keeps only the layer's input; backward fetches the block
  again, recomputes the layer with autograd on (RNG state restored, so dropout masks are
  identical), back-propagates and releases. The planner picks this where the kept activations
  would exceed ``offload.activation_budget_gib``.
* Kept layers whose weights never move (device home, no working copy) run under plain
  autograd, as PEFT does, and are not fetched again.

The adapters (``ferrytune.lora`` forward hooks) run inside the layer and receive their
gradients in its backward.

**Routed-only MoE reads** (``offload.routed_experts``, the streamer given ``expert_ranges``): a MoE
layer's block arrives as its dense part (attention, norms, router); a forward pre-hook on the layer's
experts module receives the ``top_k_index`` the HF router just computed and asks the streamer for
those experts (``fetch_experts``) before the experts run, so the unrouted experts' rows of the fused
tensors are never read. A kept layer's backward fetches the experts its forward routed to (the
saved weight references point into them); a recomputed layer routes again, identically.

A layer-major step (``_layer_major.py``) runs the layers itself, every micro-batch per layer
visit, through ``layer_calls`` and the same ``saving`` hooks.

The outer block (embedding, final norm, head) is held from the first forward of
a step to the end of its last backward: autograd needs the head's weight for the
backward of the logits.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, NamedTuple

import torch

from ferrytune.errors import FerrytuneError

from ferrytune.engine._units import UnitInterceptor, cat_rows, row_factors, slice_rows
from ferrytune.models import OUTER, ModelLayout, ParamSpec, Unit, bind, logits_at
from ferrytune.offload import BlockStreamer


def step_order(layout: ModelLayout, num_micro: int, *, backward: bool = True,
               refetch: set[str] | None = None, layer_major: bool = False) -> list[str]:
    """Visiting order of a step: outer once, then per micro-batch the layers forward and, for
    backward, the ones fetched again (``refetch``; default all) in reverse. ``layer_major``: the
    layers once forward and once in reverse, whatever ``num_micro`` (every micro-batch passes a
    layer while it is on the device; every layer is fetched again)."""
    layers = layout.layer_blocks
    if layer_major:
        return [OUTER] + layers + (layers[::-1] if backward else [])
    again = [b for b in layers[::-1] if refetch is None or b in refetch] if backward else []
    return [OUTER] + (layers + again) * num_micro


PACKING_MODEL_TYPES = ("llama", "qwen2")
"""Model types whose packed-sequence attention (position ids restarting, no mask) the tests check
isolates sequences (tests/engine/test_packing.py); others may build their mask another way."""


def check_packing_supported(model: Any, key: str = "data.packing") -> None:
    """ConfigError (one line) unless ``model``'s attention is known to honour packed position ids."""
    from ferrytune.errors import ConfigError

    cfg = model.config
    kind = getattr(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg, "model_type", None)
    if kind not in PACKING_MODEL_TYPES:
        raise ConfigError(f"{key}: packing is checked for model types {', '.join(PACKING_MODEL_TYPES)} only "
                          f"(this model is {kind!r}); set it to false")


class WeightRef(NamedTuple):
    """A saved tensor that aliased a block's working buffer: unpacked from the copy fetched for backward."""

    block: str
    offset: int  # elements from the start of the block's flat working tensor
    size: tuple[int, ...]
    stride: tuple[int, ...]


class FOEngine:
    """Runs the HF model with every layer streamed; backward keeps or recomputes each layer as
    ``keep`` says (default: the plan's ``keep``, else every layer)."""

    def __init__(self, layout: ModelLayout, streamer: BlockStreamer, *, device: torch.device,
                 keep: set[str] | None = None) -> None:
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
        if keep is None:
            planned = getattr(streamer.plan, "keep", None)
            keep = set(layout.layer_blocks) if planned is None else set(planned)
        layers = layout.layer_blocks
        self.recompute = {b for b in layers if b not in keep}
        # Kept layers whose weights stay put (device home, no working copy: the resident tier on
        # CPU) run under plain autograd like PEFT; every other layer is fetched again in backward.
        self.plain = {b for b in layers if b in keep and streamer.stays_resident(b)}
        self.refetch = {b for b in layers if b not in self.plain}
        # Counters (cumulative; tests and metrics take deltas): forwards run per layer block
        # (recomputes included), weights saved by reference, bytes of saved activations kept.
        self.layer_forwards: Counter[str] = Counter()
        self.weight_refs = 0
        self.kept_bytes = 0
        self._held: dict[str, torch.Tensor] = {}  # block -> working copy fetched for a kept backward
        self._routed: dict[str, set[int]] = {}  # block -> experts routed to since its layer last started
        self._expert_hooks = []
        if streamer.expert_ranges:
            for b, spec in layout.blocks.items():
                if spec.experts is not None and b in streamer.expert_ranges:
                    self._expert_hooks.append(spec.experts.module.register_forward_pre_hook(
                        self._routing_hook(b, spec.experts.num_experts), with_kwargs=True))
        self.layer_calls: Callable[..., Any] | None = None  # a layer-major step's handler of layer calls

    # --------------------------------------------------------------- passes
    def begin_step(self, num_micro: int, *, backward: bool = True, layer_major: bool = False) -> None:
        self.streamer.start_pass(step_order(self.layout, num_micro, backward=backward, refetch=self.refetch,
                                            layer_major=layer_major), routed=bool(self._expert_hooks))
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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, positions: torch.Tensor, *,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at ``positions``: (B, T) ids and mask, (B, L) positions -> (B, L, V).

        Packed sequences (``ferrytune.data.PackedBatch``): ``position_ids`` (R, T) restarting at 0 per
        sequence and no ``attention_mask``; ``positions`` (S, L) then index the flattened R*T tokens.
        The kwargs reach every decoder layer through the intercepted units unchanged (the rotary
        ``position_embeddings`` and the block-diagonal causal mask the model builds from them).
        """
        model = self.layout.model
        if position_ids is None:
            out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        else:
            if attention_mask is not None:
                raise ValueError("FOEngine.forward: packed sequences take position_ids and no attention_mask")
            out = model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if position_ids is not None:
            return logits_at(model, hidden.reshape(-1, hidden.shape[-1])[positions])
        idx = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return logits_at(model, torch.gather(hidden, 1, idx))

    # ------------------------------------------------------------- the unit
    def _call_unit(self, unit: Unit, orig: Callable, *args: Any, **kwargs: Any) -> Any:
        if self.layer_calls is not None and unit.block_id != OUTER:  # a layer-major step (_layer_major.py)
            return self.layer_calls(unit, orig, args, kwargs)
        if not torch.is_grad_enabled():  # no backward: fetch, run (per slice), release
            return self._run_no_grad(unit, orig, args, kwargs)
        if unit.block_id == OUTER:
            return orig(*args, **kwargs)
        if unit.block_id in self.plain:  # resident weights: autograd keeps what it needs
            _bind_block(self.layout, unit.block_id, self.streamer.acquire(unit.block_id))
            try:
                self.layer_forwards[unit.block_id] += 1
                return orig(*args, **kwargs)
            finally:
                _bind_block(self.layout, unit.block_id, None)
                self.streamer.release(unit.block_id, dirty=False)
        hidden, rest = args[0], args[1:]
        if not hidden.requires_grad:
            # The first layer's input comes from a frozen embedding; the adapters inside still
            # need a graph, so hand the function a leaf that requires grad (its grad is dropped).
            hidden = hidden.detach().requires_grad_(True)
        if unit.block_id not in self.recompute:
            return self._run_kept(unit, orig, hidden, rest, kwargs)
        box: dict[str, Any] = {}
        main = _StreamedLayer.apply(self, unit, orig, rest, kwargs, box, hidden)
        extra = box.get("extra")
        return main if extra is None else (main, *extra)

    def _run_no_grad(self, unit: Unit, orig: Callable, args: tuple, kwargs: dict) -> Any:
        layer = unit.block_id != OUTER
        if layer:
            _bind_block(self.layout, unit.block_id, self.streamer.acquire(unit.block_id))
            self.layer_forwards[unit.block_id] += 1
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

    def run_layer(self, unit: Unit, orig: Callable, hidden: torch.Tensor, rest: tuple, kwargs: dict,
                  hooks: Callable[[torch.Tensor], Any] | None = None, experts: set[int] | None = None) -> Any:
        """Acquire the layer's block, bind it, run the layer (inside ``hooks(flat)``, a context).

        ``experts`` (a recompute in backward): read them into the block before the layer runs. The
        recompute routes to the same experts, so its routing hook then reads nothing: a read that
        casts into the slot mid-forward would bump the version of tensors autograd already saved."""
        flat = self.streamer.acquire(unit.block_id)
        _bind_block(self.layout, unit.block_id, flat)
        if experts:
            self.streamer.fetch_experts(unit.block_id, experts)
        self._routed[unit.block_id] = set()
        try:
            self.layer_forwards[unit.block_id] += 1
            if hooks is None:
                return orig(hidden, *rest, **kwargs)
            with hooks(flat):
                return orig(hidden, *rest, **kwargs)
        finally:
            _bind_block(self.layout, unit.block_id, None)

    # ------------------------------------------------------- kept layers
    def _run_kept(self, unit: Unit, orig: Callable, hidden: torch.Tensor, rest: tuple, kwargs: dict) -> Any:
        b = unit.block_id
        h = hidden.detach().requires_grad_(True)  # the layer's own graph starts here
        out = self.run_layer(unit, orig, h, rest, kwargs, hooks=lambda flat: self.saving(b, flat))
        self.streamer.release(b, dirty=False)  # the slot serves the next block now
        main, extra = (out[0], tuple(out[1:])) if isinstance(out, tuple) else (out, None)
        state = _KeptState(self, b, h, main)
        state.routed = self._routed.pop(b, set())
        out_main = _KeptLayer.apply(state, hidden)
        return out_main if extra is None else (out_main, *extra)

    def saving(self, block: str, flat: torch.Tensor):
        """saved_tensors_hooks for one kept layer's forward: tensors in ``flat``'s memory leave as references."""
        storage = flat.untyped_storage().data_ptr()
        base, n = flat.storage_offset(), flat.numel()
        seen: set[int] = set()  # storages already counted (autograd saves one input for several ops)

        def pack(t: torch.Tensor):
            if t.device == flat.device and t.numel() > 0 and t.untyped_storage().data_ptr() == storage:
                off = t.storage_offset() - base
                if t.dtype != flat.dtype or not 0 <= off < n:
                    raise FerrytuneError(f"FOEngine: autograd saved a tensor aliasing block {block}'s slot that is "
                                         f"not a view of its weights (dtype {t.dtype}, offset {off}); report this")
                self.weight_refs += 1
                return WeightRef(block, off, tuple(t.shape), tuple(t.stride()))
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                self.kept_bytes += t.untyped_storage().nbytes()
            return t

        def unpack(x):
            if not isinstance(x, WeightRef):
                return x
            flat_now = self._held.get(x.block)
            if flat_now is None:
                raise FerrytuneError(f"FOEngine: backward needs block {x.block}'s weights outside its layer's "
                                     "backward (a graph edge skips the layer boundary); report this")
            return flat_now.as_strided(x.size, x.stride, flat_now.storage_offset() + x.offset)

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def _routing_hook(self, block: str, num_experts: int):
        """A forward pre-hook on ``block``'s experts module: read the experts the router picked."""
        def hook(module, args, kwargs):
            top_k = args[1] if len(args) > 1 else kwargs["top_k_index"]
            ids = {e for e in torch.unique(top_k).tolist() if 0 <= e < num_experts}
            self._routed.setdefault(block, set()).update(ids)
            self.streamer.fetch_experts(block, ids)
        return hook

    def close(self) -> None:
        for h in self._expert_hooks:
            h.remove()
        self._expert_hooks = []
        self.interceptor.uninstall()


class _KeptState:
    """One kept layer's graph between its forward and backward (freed by the backward)."""

    def __init__(self, engine: FOEngine, block: str, leaf: torch.Tensor, out: torch.Tensor) -> None:
        self.engine, self.block, self.leaf, self.out = engine, block, leaf, out
        self.routed: set[int] = set()  # the experts its forward routed to (read again for backward)


class _KeptLayer(torch.autograd.Function):
    """Joins a kept layer's own graph (leaf ``state.leaf`` -> ``state.out``) to the model's."""

    @staticmethod
    def forward(ctx, state: _KeptState, hidden: torch.Tensor) -> torch.Tensor:
        ctx.state = state
        return state.out.detach()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        state, ctx.state = ctx.state, None
        if state is None:
            raise FerrytuneError("FOEngine: a kept layer's backward ran twice (retain_graph is not supported)")
        engine = state.engine
        engine._held[state.block] = engine.streamer.acquire(state.block)
        try:
            engine.streamer.fetch_experts(state.block, state.routed)
            if state.out.requires_grad:
                torch.autograd.backward(state.out, grad_out)
        finally:
            del engine._held[state.block]
            engine.streamer.release(state.block, dirty=False)
        return None, state.leaf.grad


class _StreamedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, engine: FOEngine, unit: Unit, orig: Callable, rest: tuple, kwargs: dict,
                box: dict, hidden: torch.Tensor) -> torch.Tensor:
        ctx.engine, ctx.unit, ctx.orig, ctx.rest, ctx.kwargs = engine, unit, orig, rest, kwargs
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(engine.device) if engine.device.type == "cuda" else None
        with torch.no_grad():
            out = engine.run_layer(unit, orig, hidden, rest, kwargs)
        ctx.routed = engine._routed.pop(unit.block_id, set())  # MoE: read again before the recompute
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
                out = engine.run_layer(ctx.unit, ctx.orig, h, ctx.rest, ctx.kwargs, experts=ctx.routed)
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
