"""The zeroth-order step: MeZO's math, run ZO2-style over streamed blocks.

MeZO (Malladi et al., 2023) estimates the gradient from two forwards at
``θ + εz`` and ``θ - εz`` and updates ``θ -= lr · g · z`` with ``g = (l+ - l-) / 2ε``;
z is never stored, only regenerated from a seed. ZO2 (Wang et al., 2025) runs
both forwards per block while the block is on the device, so each block is
fetched once per step, and applies step t's update when the block arrives at
step t+1.

Here, per step and per unit, in forward order:

1. fetch the block; apply the *pending* update of the previous step
   (``p.add_(z_k, alpha=-lr·g_k/q)`` per perturbation k, weight decay first,
   stochastic rounding when the master copy is bf16);
2. for each perturbation k: ``p += εz_k``, run the ``(k,+)`` streams,
   ``p -= 2εz_k``, run the ``(k,-)`` streams, ``p += εz_k`` — the in-place
   sequence of MeZO's loop, so the weights are bit-identical to it;
3. release the block dirty (written back to its tier).

z_k of a parameter comes from the counter-based generator keyed by
``(seed, step, k, param_id)``: it does not depend on visiting order, so every
rank of a distributed job regenerates the same z. A rank computes only the
streams it owns (perturbation parallelism) but always runs the full in-place
sequence, so all ranks hold bit-identical weights.

With ``zo.block_fraction < 1`` (LeZO, Wang et al. 2024) a step perturbs and updates only the
blocks ``active_blocks(seed, step)`` draws; the others run every stream unperturbed and, when
no pending update touches them either, are released clean: no write-back, no z work.

With ``zo.mask_fraction < 1`` (Sparse MeZO, Liu et al. 2024) z is masked to the parameters of
small magnitude: ``m = |θ| <= h_p``, with ``h_p`` the ``mask_fraction`` quantile of ``|θ_p|`` in the
run's initial weights (``thresholds``, kept in the checkpoint). m is taken from the weights at the
start of each perturbation's chain, and again when the update is applied: it is recomputed on
arrival, never stored (a bitmask per block would have to be streamed like momentum).

With ``zo.estimator: fzoo`` (FZOO, Dang et al. 2025) the streams are ``(0, 0)`` — the weights as
they are, f(θ) — and ``(k, +1)`` for the N one-sided perturbations, all stacked in the same pass;
``θ + εz_k`` is built out of place per unit (``_one_sided``), so the master is never changed by the
forwards and a block only the pending update touched is the only one written back. The update is
MeZO's with the coefficients ``g_k / σ`` (``fzoo_coefficients``), applied on arrival the same way.

With ``zo.routed_experts`` (MoE layers) only the experts some stream's router picks in the step are
perturbed and updated: a forward pre-hook on each MoE layer's experts module receives the routed
``top_k_index`` and brings each newly routed expert's slices to where the chain of the other
parameters is (``+εz``; in a ``-`` stream ``+εz, -2εz``), and every later link of the chain covers it
too, so each perturbed expert sees exactly MeZO's ``+εz, -2εz, +εz``. The others are never touched
(an unrouted expert cannot change the loss). The step's routed sets ``S_k`` per layer
(``last_routed``) go with the pending update, which applies ``-lr·g_k/q·z_k`` to an expert's slices
only where ``e ∈ S_k``, and into the log for replay. z of expert ``e`` of a fused tensor is a stream of
its own (``expert_key``), so it does not depend on which other experts are perturbed.

With ``zo.estimator: hizoo`` (HiZOO, Zhao et al. 2024) a diagonal Hessian estimate H (fp32, one value
per parameter, ``H_0 = 1``) is streamed beside the weights like momentum (``hessian_streamer``, same
blocks). The pass adds the unperturbed stream ``(0, 0)`` (f(θ), run on each unit before its chain) and
the chain adds ``u_k = z_k / sqrt(H)`` instead of z_k (``v.add_(u, alpha=mult·ε)``, u materialised). On
arrival at step t+1 a block gets step t's update with the same u (H of step t), then
``H ← (1-α) H + Σ_k (α D_k / q) (H z_k z_k)`` (``hessian_update_``; D_k from the pending update), then
step t+1's chain with the new H.

A tied weight (embedding = lm_head) is used by two units. The first unit runs its chain in place
like its own parameters and keeps a copy of each perturbed value a later unit will need; the
later units bind those copies, and the last ``θ-εz`` stays in place until the block closes, when
its final ``+εz`` restores it. With q = 1 that is one copy (none for a PertP rank's ``-`` half):
the same values, in the same arithmetic, as MeZO's in-place loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ferrytune.engine._units import UnitInterceptor, cat_rows, row_factors, slice_rows
from ferrytune.engine._zo_math import CHAIN, SIGNS, ZOHyper, active_blocks, hessian_update_, zo_update_
from ferrytune.kernels import PerturbKey, add_perturbation_, perturbation, stochastic_round_
from ferrytune.models import OUTER, ModelLayout, ParamSpec, Unit, bind, logits_at
from ferrytune.offload import BlockStreamer

logger = logging.getLogger(__name__)

SR_INDEX = 1 << 20  # perturbation index reserved for the stochastic-rounding stream


def expert_key(seed: int, step: int, k: int, param_id: int, e: int) -> PerturbKey:
    """z_k of expert ``e``'s slice of a fused expert tensor (``zo.routed_experts``): the index
    ``(e + 2) << 20 | k`` is disjoint from the plain perturbation indices (``k < 2**20``) and from
    ``SR_INDEX``; up to 1022 experts per tensor."""
    return PerturbKey(seed, step, ((e + 2) << 20) | k, param_id)


@dataclass
class PendingUpdate:
    """Step ``step``'s update, waiting to be applied when each block is next fetched."""

    step: int
    grads: list[float]  # projected gradient per perturbation
    lr: float
    done: set[str] = field(default_factory=set)
    experts: dict[str, dict[int, set[int]]] | None = None  # zo.routed_experts: block -> k -> experts perturbed
    curv: list[float] | None = None  # HiZOO: D_k per perturbation (the Hessian update's scalars)


Stream = tuple[int, int]  # (perturbation index k, sign +1/-1); sign 0 = unperturbed (eval, FZOO's f(θ))


class ZOEngine:
    """Runs ZO forwards through the HF model with every unit intercepted."""

    def __init__(self, layout: ModelLayout, streamer: BlockStreamer, hyper: ZOHyper, *,
                 device: torch.device, compute_dtype: torch.dtype, store_dtype: torch.dtype,
                 state_streamer: BlockStreamer | None = None, hessian_streamer: BlockStreamer | None = None,
                 z_cache_numel: int = 64 * 2**20) -> None:
        self.layout = layout
        self.streamer = streamer
        self.state_streamer = state_streamer  # momentum, same blocks, fp32
        self.hessian_streamer = hessian_streamer  # HiZOO's H, same blocks, fp32
        if (hyper.estimator == "hizoo") != (hessian_streamer is not None):
            raise ValueError("zo.estimator hizoo needs a hessian_streamer, and only it takes one")
        self.h = hyper
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.store_dtype = store_dtype
        self.pending: PendingUpdate | None = None
        self.interceptor = UnitInterceptor(layout)
        self._row_factors = row_factors(layout)
        self.interceptor.handler = self._call_unit
        self.interceptor.install()
        units_of: dict[int, set[str]] = {}
        for u in layout.units:
            for p in u.params:
                units_of.setdefault(p.param_id, set()).add(u.name)
        self._shared = {pid for pid, us in units_of.items() if len(us) > 1}
        self._blocks = [OUTER] + layout.layer_blocks
        self._active: tuple[int, frozenset[str]] | None = None
        self.thresholds: dict[int, float] | None = None  # Sparse MeZO: param_id -> h_p (see module docstring)
        self.shared_copy_numel = 0  # elements of tied weights copied so far (q = 1: one copy per step)
        self._pass: _PassState | None = None
        # εz of the unit computing, generated once and added three times (+1, -2, +1) instead of
        # regenerated per addition; larger units fall back to the fused kernel. Same bits either way.
        self.z_cache_numel = z_cache_numel
        self._zc: torch.Tensor | None = None
        self._lo: torch.Tensor | None = None  # stochastic-rounding output, reused (see _round_buffer)
        self._ob: torch.Tensor | None = None  # FZOO's out-of-place θ+εz of one unit, reused (see _one_sided)
        # zo.routed_experts: the MoE layers' expert layouts, a routing hook on each experts module
        self._experts = {b: spec.experts for b, spec in layout.blocks.items()
                         if hyper.routed_experts and spec.experts is not None}
        self._fused = {p.param_id for ex in self._experts.values() for p in ex.fused}  # per-expert chains
        self._expert_hooks = [ex.module.register_forward_pre_hook(self._routing_hook, with_kwargs=True)
                              for ex in self._experts.values()]
        self.last_routed: dict[str, dict[int, set[int]]] | None = None  # the last training pass's S_k per layer

    def close(self) -> None:
        """Remove the unit interception and the routing hooks."""
        for h in self._expert_hooks:
            h.remove()
        self._expert_hooks = []
        self.interceptor.uninstall()

    # ------------------------------------------------------------- one pass
    def run(self, step: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            positions: torch.Tensor, streams: list[Stream], rows_per_stream: int,
            head_fn: Callable[[torch.Tensor], Any], *, dirty: bool = True, num_micro: int = 1) -> Any:
        """Run one pass over the stacked batch; returns ``head_fn``'s result on the head output.

        ``input_ids``/``attention_mask``: (S*M*R, T): stream s owns rows s*M*R:(s+1)*M*R,
        made of M micro-batches of R rows. Each unit runs once per (stream, micro-batch)
        chunk, so a row's arithmetic never depends on how many micro-batches a rank holds
        (data-parallel ranks then match a single process bit for bit).
        ``positions``: (S*M*R, L) positions whose hidden states go through the head.
        """
        order = self._blocks
        self.streamer.start_pass(order)
        updating = [b for b in order if self._needs_update(b)] if dirty else []
        momentum = self.state_streamer is not None and bool(updating)
        if momentum:
            self.state_streamer.start_pass(updating)
        self._pass = _PassState(step=step, streams=streams, rows=rows_per_stream, dirty=dirty, num_micro=num_micro,
                                active=frozenset() if all(s[1] == 0 for s in streams) else self.active(step))
        hess = self.hessian_streamer is not None and dirty and bool(self._pass.active)
        if hess:  # the chain reads H of every perturbed block, the update changes it
            hess_order = [b for b in order if b in self._pass.active or b in updating]
            self._pass.hess_blocks = frozenset(hess_order)
            self.hessian_streamer.start_pass(hess_order)
        ok = False
        try:
            self._open_block(OUTER)
            model = self.layout.model
            with torch.no_grad():
                out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                idx = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
                h = torch.gather(hidden, 1, idx)  # (N, L, C)
                logits = logits_at(model, h)  # (N, L, V), through the head unit and the model's head code
                result = head_fn(logits)
            self._close_block(OUTER)
            ok = True
            if self._experts and dirty and not all(s[1] == 0 for s in streams):
                self.last_routed = self._pass.routed
        finally:
            self._pass = None
            for st in ([self.streamer] + ([self.state_streamer] if momentum else [])
                       + ([self.hessian_streamer] if hess else [])):
                st.finish_pass() if ok else st.abort_pass()
        return result

    def flush(self) -> None:
        """Apply the pending update to every block (before eval, checkpoint, end)."""
        if self.pending is None:
            return
        order = [b for b in self._blocks if self._needs_update(b)]
        states = [st for st in (self.state_streamer, self.hessian_streamer) if st is not None]
        for st in [self.streamer] + states:
            st.start_pass(order)
        for b in order:
            flat = self.streamer.acquire(b)
            hess = None if self.hessian_streamer is None else self.hessian_streamer.acquire(b)
            self._apply_update(b, flat, hess)
            self.streamer.release(b, dirty=True)
            if hess is not None:
                self.hessian_streamer.release(b, dirty=True)
        for st in [self.streamer] + states:
            st.finish_pass()
        self.pending = None

    def replay_step(self, step: int, routed: dict[str, dict[int, set[int]]] | None = None) -> None:
        """Redo step ``step``'s weight arithmetic without its forwards (``ferrytune replay``).

        Applies the pending update and runs every parameter's in-place ``+εz, -2εz, +εz``
        chain, exactly as the training pass did, so replaying the (seed, g) log from the
        initial weights reproduces the trained weights bit for bit. ``routed``
        (``zo.routed_experts``): the step's logged ``S_k`` per layer; a fused expert tensor's
        chain runs on those experts' slices only.
        """
        order = self._blocks
        self.streamer.start_pass(order)
        updating = [b for b in order if self._needs_update(b)]
        momentum = self.state_streamer is not None and bool(updating)
        if momentum:
            self.state_streamer.start_pass(updating)
        active = self.active(step)
        hizoo = self.hessian_streamer is not None
        if hizoo:
            self.hessian_streamer.start_pass(order)
        for b in order:
            flat = self.streamer.acquire(b)
            hess = self.hessian_streamer.acquire(b) if hizoo else None
            touched = b in updating
            if touched:
                self._apply_update(b, flat, hess)
            if hizoo:
                self.hessian_streamer.release(b, dirty=touched)
            if b in active and hizoo:
                touched = True
                for p in self.layout.blocks[b].params:
                    for k in range(self.h.num_perturbations):
                        chain = _Chain(self, flat, [p], step, k, hess)
                        for mult in CHAIN:
                            chain.apply(mult)
            elif b in active and self.h.estimator == "mezo":  # FZOO's forwards leave the weights untouched
                touched = True
                ex = self._experts.get(b)
                for p in self.layout.blocks[b].params:
                    v = _view(flat, p)
                    if p.param_id in self._fused:
                        for k, experts in sorted((routed or {}).get(b, {}).items()):
                            for e in sorted(experts):
                                for mult in CHAIN:
                                    self._perturb_expert(v, step, k, p, e, mult * self.h.eps, ex)
                        continue
                    for k in range(self.h.num_perturbations):
                        mask = self._mask(v, p)
                        for mult in CHAIN:
                            self._perturb(v, step, k, p, mult * self.h.eps, mask)
            self.streamer.release(b, dirty=touched)
        self.streamer.finish_pass()
        if momentum:
            self.state_streamer.finish_pass()
        if hizoo:
            self.hessian_streamer.finish_pass()

    # ------------------------------------------------------------ block life
    def active(self, step: int) -> frozenset[str]:
        """The blocks step ``step`` perturbs and updates (all of them unless ``block_fraction < 1``)."""
        if self._active is None or self._active[0] != step:
            self._active = (step, active_blocks(self._blocks, seed=self.h.seed, step=step,
                                                fraction=self.h.block_fraction))
        return self._active[1]

    def _needs_update(self, b: str) -> bool:
        """Whether the pending update still has to be applied to block ``b``."""
        upd = self.pending
        return upd is not None and b not in upd.done and b in self.active(upd.step)

    def _open_block(self, b: str) -> None:
        flat = self.streamer.acquire(b)
        hess = None
        if b in self._pass.hess_blocks:
            hess = self._pass.hess[b] = self.hessian_streamer.acquire(b)
        if self._pass.dirty and self._needs_update(b):
            updated = self._apply_update(b, flat, hess)
            self._pass.touched.add(b)
            self._pass.changed_experts.setdefault(b, set()).update(updated)
        for p in self.layout.blocks[b].params:
            bind(p, _view(flat, p))
        self._pass.open[b] = flat

    def _close_block(self, b: str) -> None:
        self._pass.open.pop(b)
        for p in self.layout.blocks[b].params:
            pending = self._pass.restore_at_close.pop(p.param_id, None)
            if pending is not None:  # the chain's last +εz of a shared value (see _call_unit)
                chain, i = pending
                chain.restore(i)
            bind(p, None)
        ps = self._pass
        perturbed_in_place = ps.perturbs(b) and self.h.estimator != "fzoo"  # FZOO perturbs copies
        dirty = ps.dirty and (b in ps.touched or perturbed_in_place)
        ranges, ex = None, self._experts.get(b)
        if dirty and ex is not None:  # routed experts: the dense part and the experts that changed, only
            changed = ps.changed_experts.get(b, set()).union(*ps.routed.get(b, {}).values())
            ranges = [(0, ex.dense_numel)] + [r for e in sorted(changed) for r in ex.ranges(e)]
        self.streamer.release(b, dirty=dirty, ranges=ranges)
        if b in ps.hess:
            del ps.hess[b]
            self.hessian_streamer.release(b, dirty=b in ps.touched)

    # -------------------------------------------------------------- the unit
    def _call_unit(self, unit: Unit, orig: Callable, *args: Any, **kwargs: Any) -> Any:
        ps = self._pass
        is_layer = unit.block_id != OUTER
        if is_layer:
            self._open_block(unit.block_id)
        flat = ps.open[unit.block_id]
        n_total = len(ps.streams) * ps.num_micro * ps.rows
        if all(s[1] == 0 for s in ps.streams):  # unperturbed (evaluation)
            result = orig(*args, **kwargs)
        elif not ps.perturbs(unit.block_id):  # not drawn this step: every stream sees the same weights
            n_chunks = len(ps.streams) * ps.num_micro
            outs = [orig(*a, **kw) for a, kw in (slice_rows((args, kwargs), n_total, c * ps.rows, (c + 1) * ps.rows,
                                                            self._row_factors) for c in range(n_chunks))]
            result = cat_rows(outs, [ps.rows] * n_chunks)
        elif self.h.estimator == "fzoo":
            result = self._one_sided(unit, orig, flat, args, kwargs, n_total)
        else:
            ex = self._experts.get(unit.block_id)
            own = [p for p in unit.params if p.param_id not in self._shared and p.param_id not in self._fused]
            shared = [p for p in unit.params if p.param_id in self._shared]
            by_stream: dict[tuple[int, int, int], Any] = {}
            hess = ps.hess[unit.block_id] if unit.block_id in ps.hess_blocks else None
            if (0, 0) in ps.streams:  # HiZOO's f(θ): the weights before any link of the chain
                for p in shared:  # the first unit uses the value in place and keeps a copy for the later ones
                    held = ps.shared_theta.get(p.param_id)
                    if held is None:
                        ps.shared_theta[p.param_id] = _view(flat, p).clone()
                        self.shared_copy_numel += p.numel
                    else:
                        bind(p, held)
                by_stream.update(self._run_stream(ps, (0, 0), orig, args, kwargs, n_total))
                for p in shared:
                    bind(p, _view(flat, p))
            ks = sorted({s[0] for s in ps.streams if s[1] != 0})
            for k in ks:
                first = [p for p in shared if (p.param_id, k) not in ps.shared_cache]  # this unit runs their chain
                later = [p for p in shared if p not in first]
                last_k = k == ks[-1]
                chain = _Chain(self, flat, own + first, ps.step, k, hess)
                ps.experts = None if ex is None else _ExpertChain(self, flat, ex, ps.step, k)
                for sign, mult in zip(SIGNS, CHAIN):
                    chain.apply(mult)
                    if ps.experts is not None:
                        ps.experts.apply(mult)
                    for p in first:  # what later units bind: a copy, or (the last θ-εz) the block itself
                        keep = None if (last_k and sign == -1) or (k, sign) not in ps.streams else \
                            _view(flat, p).clone()
                        self.shared_copy_numel += 0 if keep is None else p.numel
                        ps.shared_cache.setdefault((p.param_id, k), {})[sign] = keep
                    if (k, sign) in ps.streams:
                        for p in later:
                            held = ps.shared_cache[(p.param_id, k)][sign]
                            bind(p, _view(flat, p) if held is None else held)
                        by_stream.update(self._run_stream(ps, (k, sign), orig, args, kwargs, n_total))
                if last_k:  # the shared values' final +εz waits for the block's close (later units read θ-εz)
                    ps.restore_at_close.update((p.param_id, (chain, len(own) + i)) for i, p in enumerate(first))
                chain.apply(CHAIN[2], first=len(own) if last_k else None)
                if ps.experts is not None:
                    ps.experts.apply(CHAIN[2])
                    ps.routed.setdefault(unit.block_id, {})[k] = ps.experts.perturbed
                    ps.experts = None
            for p in shared:
                bind(p, _view(flat, p))
            outs = [by_stream[(k, sign, m)] for k, sign in ps.streams for m in range(ps.num_micro)]
            result = cat_rows(outs, [ps.rows] * len(outs))
        if is_layer:
            self._close_block(unit.block_id)
        return result

    def _run_stream(self, ps: "_PassState", stream: Stream, orig: Callable, args: Any, kwargs: Any,
                    n_total: int) -> dict[tuple[int, int, int], Any]:
        """The unit on each micro-batch chunk of ``stream``'s rows, with the weights bound now."""
        i, out = ps.streams.index(stream), {}
        for m in range(ps.num_micro):
            c = i * ps.num_micro + m
            a, kw = slice_rows((args, kwargs), n_total, c * ps.rows, (c + 1) * ps.rows, self._row_factors)
            out[(*stream, m)] = orig(*a, **kw)
        return out

    def _one_sided(self, unit: Unit, orig: Callable, flat: torch.Tensor, args: Any, kwargs: Any, n_total: int) -> Any:
        """FZOO's streams on one unit: ``(0, 0)`` with the weights as they are, ``(k, +1)`` with
        ``θ + εz_k`` computed out of place (``copy``, then the fused kernel's ``+εz_k``) into a
        unit-sized buffer. The master is never perturbed in place, so nothing has to be restored
        (its bits cannot drift), a tied weight's later unit computes the same copy again, and
        replay has no chain to redo."""
        ps, h = self._pass, self.h
        numel = sum(p.numel for p in unit.params)
        if self._ob is None or self._ob.numel() < numel or self._ob.dtype != flat.dtype:
            self._ob = torch.empty(numel, dtype=flat.dtype, device=flat.device)
        outs = []
        try:
            for i, (k, sign) in enumerate(ps.streams):
                off = 0
                for p in unit.params:
                    v = _view(flat, p)
                    if sign == 0:
                        bind(p, v)
                    else:
                        t = self._ob[off:off + p.numel].view(p.shape).copy_(v)
                        add_perturbation_(t, PerturbKey(h.seed, ps.step, k, p.param_id), alpha=sign * h.eps,
                                          dist=h.distribution)
                        bind(p, t)
                    off += p.numel
                for m in range(ps.num_micro):
                    c = i * ps.num_micro + m
                    a, kw = slice_rows((args, kwargs), n_total, c * ps.rows, (c + 1) * ps.rows, self._row_factors)
                    outs.append(orig(*a, **kw))
        finally:
            for p in unit.params:
                bind(p, _view(flat, p))
        return cat_rows(outs, [ps.rows] * len(outs))

    def _routing_hook(self, module, args, kwargs) -> None:
        """Forward pre-hook of a MoE layer's experts module: catch newly routed experts up with the chain."""
        ps = self._pass
        if ps is None or ps.experts is None:  # not a perturbed stream (eval, a block not drawn)
            return
        top_k = args[1] if len(args) > 1 else kwargs["top_k_index"]
        ps.experts.route(torch.unique(top_k).tolist())

    def _perturb_expert(self, v: torch.Tensor, step: int, k: int, p: ParamSpec, e: int, alpha: float,
                        ex) -> None:
        """``v[e] += alpha * z_k,e`` on expert ``e``'s slice of the fused tensor ``v`` (``expert_key``)."""
        per = p.numel // ex.num_experts
        add_perturbation_(v.view(-1)[e * per:(e + 1) * per], expert_key(self.h.seed, step, k, p.param_id, e),
                          alpha=alpha, dist=self.h.distribution)

    def _round_buffer(self, numel: int) -> torch.Tensor:
        """A reusable store-dtype buffer for one parameter's rounded values. A fresh tensor per
        parameter and step made glibc's heap grow step after step (+0.3 GiB/step, bench_rss.py)."""
        if self._lo is None or self._lo.numel() < numel:
            self._lo = torch.empty(numel, dtype=self.store_dtype, device=self.device)
        return self._lo[:numel]

    def _z_cache(self, numel: int) -> torch.Tensor | None:
        """A reusable fp32 buffer for εz of one unit, or None when the unit exceeds ``z_cache_numel``."""
        if numel > self.z_cache_numel:
            return None
        if self._zc is None or self._zc.numel() < numel:
            self._zc = torch.empty(numel, dtype=torch.float32, device=self.device)
        return self._zc[:numel]

    def _perturb(self, v: torch.Tensor, step: int, k: int, p: ParamSpec, alpha: float,
                 mask: torch.Tensor | None = None) -> None:
        """``v += alpha * z_k`` with z regenerated in the same fused pass (no z buffer is kept);
        with a 0/1 ``mask``: ``v += fl(alpha * z_k) * mask`` (z materialised)."""
        key = PerturbKey(self.h.seed, step, k, p.param_id)
        if mask is None:
            add_perturbation_(v, key, alpha=alpha, dist=self.h.distribution)
        else:
            v.add_(perturbation(key, v.shape, dist=self.h.distribution, device=v.device).mul_(alpha).mul_(mask))

    def _mask(self, v: torch.Tensor, p: ParamSpec) -> torch.Tensor | None:
        """Sparse MeZO's mask of ``v`` (1 where ``|v| <= h_p``), or None when z is not masked."""
        if self.thresholds is None:
            return None
        return (v.abs() <= self.thresholds[p.param_id]).to(v.dtype)

    # ------------------------------------------------------------ the update
    def _apply_update(self, b: str, flat: torch.Tensor, hess: torch.Tensor | None = None) -> set[int]:
        """The pending update on block ``b``; returns the experts it changed (``zo.routed_experts``)."""
        upd = self.pending
        h = self.h
        mom = None
        if self.state_streamer is not None:
            mom = self.state_streamer.acquire(b)
        ex = self._experts.get(b)
        for p in self.layout.blocks[b].params:
            v = _view(flat, p)
            if hess is not None:
                self._hizoo_update(v, p, upd, _view(hess, p), None if mom is None else _view(mom, p))
            elif p.param_id in self._fused:
                self._update_experts(b, v, p, ex, upd, None if mom is None else _view(mom, p))
            else:
                mask = self._mask(v, p)
                zo_update_(v, lambda t, k, a, p=p, m=mask: self._perturb(t, upd.step, k, p, a, m), upd.grads,
                           lr=upd.lr, hyper=h, momentum=None if mom is None else _view(mom, p))
            if self.store_dtype != torch.float32:
                # bf16 masters: round stochastically so updates far below one ulp survive in expectation.
                lo = self._round_buffer(p.numel).view(p.shape)
                stochastic_round_(v, lo, PerturbKey(h.seed, upd.step, SR_INDEX, p.param_id))
                v.copy_(lo)
        if mom is not None:
            self.state_streamer.release(b, dirty=True)
        upd.done.add(b)
        sets = (upd.experts or {}).get(b, {}) if ex is not None else {}
        return set().union(*sets.values()) if sets else set()


    def _hizoo_update(self, v: torch.Tensor, p: ParamSpec, upd: PendingUpdate, h: torch.Tensor,
                      mom: torch.Tensor | None) -> None:
        """HiZOO's update of ``v`` with ``u_k = z_k / sqrt(H)`` (H as step ``upd.step`` perturbed with), then
        its Hessian update of ``h`` in place."""
        zs = [perturbation(PerturbKey(self.h.seed, upd.step, k, p.param_id), v.shape, dist=self.h.distribution,
                           device=v.device) for k in range(len(upd.grads))]
        us = [z / h.sqrt() for z in zs]
        zo_update_(v, lambda t, k, a: t.add_(us[k], alpha=a), upd.grads, lr=upd.lr, hyper=self.h, momentum=mom)
        hessian_update_(h, zs, upd.curv, self.h.hessian_smooth)

    def _update_experts(self, b: str, v: torch.Tensor, p: ParamSpec, ex, upd: PendingUpdate,
                        mom: torch.Tensor | None) -> None:
        """The update on the slices of the experts step ``upd.step`` perturbed (z_k,e only where e ∈ S_k);
        the others keep their bits (weight decay and momentum included)."""
        sets = (upd.experts or {}).get(b, {})
        per = p.numel // ex.num_experts
        for e in sorted(set().union(*sets.values()) if sets else ()):
            def add_z(t, k, a, e=e):
                if e in sets.get(k, ()):
                    add_perturbation_(t, expert_key(self.h.seed, upd.step, k, p.param_id, e), alpha=a,
                                      dist=self.h.distribution)
            v_e = v.view(-1)[e * per:(e + 1) * per].view(p.shape[1:])
            m_e = None if mom is None else mom.view(-1)[e * per:(e + 1) * per].view(p.shape[1:])
            zo_update_(v_e, add_z, upd.grads, lr=upd.lr, hyper=self.h, momentum=m_e)


class _ExpertChain:
    """One perturbation k's chain on a MoE layer's fused expert tensors, expert by expert as routed.

    ``applied``: the multipliers the layer's other parameters have had so far; an expert first routed
    in a stream gets those (``route``), every later ``apply`` covers it, so each perturbed expert's
    slices see exactly ``+εz, -2εz, +εz``."""

    def __init__(self, engine: "ZOEngine", flat: torch.Tensor, ex, step: int, k: int) -> None:
        self.e, self.flat, self.ex, self.step, self.k = engine, flat, ex, step, k
        self.applied: list[int] = []
        self.perturbed: set[int] = set()

    def _add(self, e: int, mult: int) -> None:
        for p in self.ex.fused:
            self.e._perturb_expert(_view(self.flat, p), self.step, self.k, p, e, mult * self.e.h.eps, self.ex)

    def apply(self, mult: int) -> None:
        for e in sorted(self.perturbed):
            self._add(e, mult)
        self.applied.append(mult)

    def route(self, experts) -> None:
        for e in sorted({int(x) for x in experts if 0 <= int(x) < self.ex.num_experts} - self.perturbed):
            for mult in self.applied:
                self._add(e, mult)
            self.perturbed.add(e)


class _Chain:
    """MeZO's in-place ``+εz, -2εz, +εz`` on a unit's own parameters, one perturbation k.

    With a z cache: ``εz`` is generated once per parameter (``fl(ε·z)``) and added with
    multipliers 1, -2, 1 — exact power-of-two scalings of it — so every result is
    bit-identical to the fused kernel's ``fl(p + fl(mult·ε·z))``.

    With ``hess`` (HiZOO, the block's H): ``u = z / sqrt(H)`` is materialised per parameter and added
    as ``v.add_(u, alpha=mult·ε)``.
    """

    def __init__(self, engine: "ZOEngine", flat: torch.Tensor, params: list[ParamSpec], step: int, k: int,
                 hess: torch.Tensor | None = None):
        self.e, self.flat, self.params, self.step, self.k = engine, flat, params, step, k
        self.masks = [engine._mask(_view(flat, p), p) for p in params]  # from the weights before the chain
        self.u = None if hess is None else [
            perturbation(PerturbKey(engine.h.seed, step, k, p.param_id), p.shape, dist=engine.h.distribution,
                         device=flat.device) / _view(hess, p).sqrt() for p in params]
        self.cache = None if hess is not None else engine._z_cache(sum(p.numel for p in params))
        if self.cache is not None:
            off = 0
            self.ez = []
            for p in params:
                ez = self.cache[off: off + p.numel].view(p.shape).zero_()
                add_perturbation_(ez, PerturbKey(engine.h.seed, step, k, p.param_id), alpha=engine.h.eps,
                                  dist=engine.h.distribution)  # 0 + fl(ε·z) = fl(ε·z) exactly
                if self.masks[len(self.ez)] is not None:
                    ez.mul_(self.masks[len(self.ez)])
                self.ez.append(ez)
                off += p.numel

    def apply(self, mult: int, first: int | None = None) -> None:
        """Add ``mult·εz`` to the parameters (only the ``first`` ones, when given)."""
        for i, p in enumerate(self.params[:first]):
            v = _view(self.flat, p)
            if self.u is not None:
                v.add_(self.u[i], alpha=mult * self.e.h.eps)
            elif self.cache is not None:
                v.add_(self.ez[i], alpha=mult)
            else:
                self.e._perturb(v, self.step, self.k, p, mult * self.e.h.eps, self.masks[i])

    def restore(self, i: int) -> None:
        """The last link (``+εz``) of parameter ``i`` alone, after the unit (a shared value's, at its
        block's close): z regenerated, since the cache holds a later unit's by then (HiZOO: its u)."""
        p = self.params[i]
        v = _view(self.flat, p)
        if self.u is not None:
            v.add_(self.u[i], alpha=CHAIN[2] * self.e.h.eps)
        else:
            self.e._perturb(v, self.step, self.k, p, CHAIN[2] * self.e.h.eps, self.masks[i])


@dataclass
class _PassState:
    step: int
    streams: list[Stream]
    rows: int
    dirty: bool
    num_micro: int = 1
    active: frozenset[str] = frozenset()  # blocks this pass perturbs
    touched: set[str] = field(default_factory=set)  # blocks the pending update changed in this pass
    open: dict[str, torch.Tensor] = field(default_factory=dict)
    shared_cache: dict = field(default_factory=dict)  # (param_id, k) -> {sign: copy, or None: the block itself}
    restore_at_close: dict[int, tuple["_Chain", int]] = field(default_factory=dict)  # param_id -> (chain, index)
    shared_theta: dict[int, torch.Tensor] = field(default_factory=dict)  # HiZOO: a shared value's θ for later units
    hess: dict[str, torch.Tensor] = field(default_factory=dict)  # HiZOO training pass: the H of each open block
    hess_blocks: frozenset[str] = frozenset()  # HiZOO training pass: the blocks whose H it reads (empty otherwise)
    experts: "_ExpertChain | None" = None  # zo.routed_experts: the chain of the unit computing now
    routed: dict[str, dict[int, set[int]]] = field(default_factory=dict)  # block -> k -> experts perturbed
    changed_experts: dict[str, set[int]] = field(default_factory=dict)  # block -> experts the update changed


    def perturbs(self, b: str) -> bool:
        return b in self.active


def _view(flat: torch.Tensor, p: ParamSpec) -> torch.Tensor:
    return flat[p.offset: p.offset + p.numel].view(p.shape)
