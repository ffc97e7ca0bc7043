"""``method: lora`` — backprop LoRA with the frozen base streamed from the tiers.

Per step: for each of this rank's micro-batches, a streamed forward (blocks in
order) and a backward (blocks fetched again in reverse; each layer's activations kept
or, where the plan says so, recomputed) — or, with ``train.accumulation: layer_major``
where the plan allows it, every micro-batch through each layer while it is on the device,
forward and backward (``_layer_major.py``: the base read once per step); the loss of
a micro-batch is the sum of its per-sample losses over the *global* batch size,
so summing gradients over micro-batches and ranks gives the gradient of the
global mean. Ranks all-reduce the (small) LoRA gradients once per step — the
data-parallel part of DDP, without bucketing, since only adapters train — then
clip, and step the optimizer (``train.optimizer``: AdamW, Adam-mini or SGD-SaI, ``_optim.py``)
with the schedule's learning rate. Every rank ends the step
with identical adapters.

``data.packing``: a micro-batch's sequences go end to end into one row (``collate_packed``), with
position ids restarting at 0 per sequence and no attention mask, so transformers' packed-sequence
mask keeps every sequence's attention to itself; the loss is per sequence as before, with the same
normalisation, so packed training equals unpacked up to float rounding (other GEMM shapes).
Each step's metrics line carries ``real_tokens`` and ``padded_tokens`` (what the forwards computed).

Checkpoints hold the adapter (PEFT format), the optimizer's state and the step; the
data order is a pure function of the step, so resume is exact with the same or
a different world size.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import torch

from ferrytune.data import collate, collate_packed, correct_per_sample, eval_batches
from ferrytune.data import loss_per_sample
from ferrytune.atomic import fsync_dir, write_atomic_json
from ferrytune.engine._activations import lora_activation_estimate, lora_runtime_args
from ferrytune.engine._checkpoint import checkpoint_dir, prune_checkpoints
from ferrytune.engine._fo import FOEngine, check_packing_supported
from ferrytune.engine._layer_major import LayerMajorStep
from ferrytune.engine._loop import StepLoop, StepResult
from ferrytune.engine._optim import build_optimizer, load_optimizer_state
from ferrytune.engine._runtime import build_runtime, weights_from
from ferrytune.engine._schedule import lr_at
from ferrytune.data import pad_positions
from ferrytune.errors import ConfigError
from ferrytune.lora import Adapter, LoraSpec, attach, find_targets, load_peft, save_peft
from ferrytune.parallel import AgreementCheck, adapter_sample
from ferrytune.parallel import all_reduce_sum_

logger = logging.getLogger(__name__)

OPTIM_NAME = "optimizer.pt"
ADAPTER_DIR = "adapter"


def micro_seed(seed: int, step: int, micro: int) -> int:
    """A 63-bit RNG seed for one micro-batch of one step."""
    digest = hashlib.blake2b(f"{seed}:{step}:{micro}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class LoraTrainer(StepLoop):
    """Owns the runtime, adapter and optimizer of one ``method: lora`` run; the loop is :class:`StepLoop`'s."""

    method = "lora"

    def setup(self) -> None:
        cfg, mesh = self.cfg, self.mesh
        if cfg.parallel.sliced_loading and mesh.distributed:
            raise ConfigError("parallel.sliced_loading: implemented for method: zo only; set it to false for lora")
        self.agree = AgreementCheck(mesh, every_steps=cfg.parallel.check_every_steps)
        self._resolve_resume("lora")
        estimate = self._activation_estimate()  # None: no backward (ZOLoraTrainer)
        extra = {} if estimate is None else {**lora_runtime_args(cfg), "activation_estimate": estimate}
        self.rt = build_runtime(cfg.model, cfg.offload, device=cfg.device, nvme_subdir=self.nvme_subdir(), **extra)
        rt = self.rt
        logger.info("plan:\n%s", rt.plan.describe())
        if cfg.train.accumulation != "micro_major" and rt.plan.accumulation != "layer_major":
            several = cfg.train.num_micro_batches > cfg.parallel.data  # else both orders are the same
            logger.log(logging.WARNING if several else logging.INFO, "running micro_major: %s",
                       rt.plan.accumulation_why)
        rt.streamer.open(weights_from(cfg.model.path, rt.layout))  # the base is read-only: always model.path
        self.engine = FOEngine(rt.layout, rt.streamer, device=rt.device)
        model = rt.layout.model
        if cfg.data.packing:
            check_packing_supported(model)
        if self.ckpt is not None:
            self.adapter, self.spec = load_peft(self.ckpt / ADAPTER_DIR, model)
        elif cfg.lora.init_from:
            self.adapter, self.spec = load_peft(cfg.lora.init_from, model)
        else:
            self.spec = LoraSpec.from_config(cfg.lora)
            self.adapter = Adapter.create(find_targets(model, self.spec), self.spec, seed=cfg.train.seed)
        self.adapter.to(rt.device)
        self.params = [p for p in self.adapter.parameters()]
        self._setup_training()
        self._setup_data()

    def _activation_estimate(self):
        """What one layer keeps for backward (the planner keeps or recomputes per layer from it)."""
        return lora_activation_estimate(self.cfg)

    def _setup_training(self) -> None:
        """The hooks and optimizer of backprop LoRA (``ZOLoraTrainer`` sets up its own instead)."""
        cfg, model = self.cfg, self.rt.layout.model
        # Train mode as with PEFT: adapter dropout follows the hooked module's flag (and so does any
        # dropout the base architecture has); evaluation switches to eval mode.
        model.train()
        self.handle = attach(model, [self.adapter])
        self.optim = build_optimizer(self.params, cfg.train)
        if self.ckpt is not None and (self.ckpt / OPTIM_NAME).exists():
            load_optimizer_state(self.optim, torch.load(self.ckpt / OPTIM_NAME, map_location=self.rt.device),
                                 cfg.train.optimizer, source=str(self.ckpt / OPTIM_NAME))

    # ----------------------------------------------------------------- step
    def train_step(self, step: int) -> StepResult:
        """One optimizer step over the global batch."""
        t, dev = self.cfg.train, self.rt.device
        if self.cfg.data.packing:  # each micro-batch's sequences end to end in one row, no padding
            micro = [collate_packed(mb, pad_id=self.pad_id) for mb in self.batcher.local_batch_for_step(step)]
        else:
            micro = pad_positions(self.batcher.batches_for_step(step, pad_id=self.pad_id))
        self.optim.zero_grad(set_to_none=False)
        loss_sum = torch.zeros(1, dtype=torch.float64)
        world, rank = self.mesh.data, self.mesh.dp_rank
        layer_major = self.rt.plan.accumulation == "layer_major" and len(micro) > 1
        self.engine.begin_step(len(micro), layer_major=layer_major)
        try:
            if layer_major:
                loss_sum += self._layer_major(step, micro)
            else:
                for i, mb in enumerate(micro):
                    # Dropout masks depend on (seed, step, global micro-batch) only: identical on any
                    # number of ranks and after a resume.
                    torch.manual_seed(micro_seed(t.seed, step, i * world + rank))
                    b = mb.to(dev)
                    per = loss_per_sample(self._forward(b), b)  # (B,): per sequence, packed or not
                    loss = per.sum() / t.batch_size
                    loss.backward()
                    loss_sum += float(per.detach().sum())
        except BaseException:
            self.engine.end_step(failed=True)
            raise
        self.engine.end_step()
        self._reduce_grads()
        all_reduce_sum_(loss_sum, self.mesh)
        if t.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip, foreach=False)
        for g in self.optim.param_groups:
            g["lr"] = lr_at(step, t)
        self.optim.step()
        loss = float(loss_sum) / t.batch_size
        self.agree.update(loss, lr_at(step, t))
        if self.cfg.data.packing:
            real, padded = sum(m.real_tokens for m in micro), sum(m.padded_tokens for m in micro)
        else:
            real, padded = sum(int(m.attention_mask.sum()) for m in micro), sum(m.input_ids.numel() for m in micro)
        # tokens the forwards computed (padding included) beside the real ones, this rank
        return StepResult(loss, lr_at(step, t), real, {"real_tokens": real, "padded_tokens": padded})

    def _forward(self, b):
        """Logits at ``b``'s scored positions: packed rows go with their position ids and no mask (the
        block-diagonal attention follows from them), padded rows with their attention mask."""
        if self.cfg.data.packing:
            return self.engine.forward(b.input_ids, None, b.loss_positions, position_ids=b.position_ids)
        return self.engine.forward(b.input_ids, b.attention_mask, b.loss_positions)

    def _layer_major(self, step: int, micro: list) -> float:
        """The micro-batches of a step in layer-major order (``_layer_major.py``); the same seeds and
        losses as the micro-batch-major loop of ``train_step``. Returns the sum of per-sample losses."""
        t, dev = self.cfg.train, self.rt.device
        world, rank = self.mesh.data, self.mesh.dp_rank
        batches = [mb.to(dev) for mb in micro]
        total = [0.0]

        def loss(i: int, logits: torch.Tensor) -> torch.Tensor:
            per = loss_per_sample(logits, batches[i])
            total[0] += float(per.detach().sum())
            return per.sum() / t.batch_size

        packed = self.cfg.data.packing
        LayerMajorStep(self.engine).run([(b.input_ids, None if packed else b.attention_mask, b.loss_positions,
                                          b.position_ids if packed else None) for b in batches],
                                        lambda i: torch.manual_seed(micro_seed(t.seed, step, i * world + rank)), loss)
        return total[0]

    def _reduce_grads(self) -> None:
        if not self.mesh.distributed:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in self.params])
        all_reduce_sum_(flat, self.mesh)
        off = 0
        for p in self.params:
            n = p.numel()
            p.grad.copy_(flat[off:off + n].view_as(p))
            off += n

    def check_agreement(self, step: int) -> None:
        self.agree.check(step, sample=adapter_sample(self.params))

    def save_final(self, final: Path) -> None:
        if self.mesh.is_main:
            save_peft(self.adapter, final, base_model_name_or_path=str(self.cfg.model.path), spec=self.spec)

    # ------------------------------------------------------ eval, checkpoint
    def evaluate(self, *, prefix: str = "") -> dict:
        if not self.eval_examples:
            return {}
        n = self.cfg.data.eval_samples
        examples = self.eval_examples[:n] if n else self.eval_examples
        mb = self.cfg.train.micro_batch_size or self.cfg.train.batch_size
        totals = torch.zeros(3, dtype=torch.float64)
        self.rt.layout.model.eval()
        chunks = list(eval_batches(examples, micro_batch_size=mb, rank=self.mesh.dp_rank, world_size=self.mesh.data))
        packed = self.cfg.data.packing  # each chunk's sequences end to end, as training runs them
        with torch.no_grad():
            for chunk in self.eval_progress(chunks):
                b = (collate_packed(chunk, pad_id=self.pad_id) if packed else
                     pad_positions([collate(chunk, pad_id=self.pad_id)])[0]).to(self.rt.device)
                self.engine.begin_step(1, backward=False)
                try:
                    logits = self._forward(b)
                except BaseException:
                    self.engine.end_step(failed=True)
                    raise
                self.engine.end_step()
                totals += torch.tensor([float(loss_per_sample(logits, b).sum()),
                                        float(correct_per_sample(logits, b).sum()), b.batch_size], dtype=torch.float64)
        self.rt.layout.model.train()
        return self._eval_result(totals, prefix)

    def save_checkpoint(self, step: int) -> Path | None:
        if not self.mesh.is_main:
            return None
        dest = checkpoint_dir(self.output_dir, step)
        tmp = dest.parent / f".tmp-{dest.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_peft(self.adapter, tmp / ADAPTER_DIR, base_model_name_or_path=str(self.cfg.model.path), spec=self.spec)
        self._save_optimizer(tmp)
        write_atomic_json(tmp / "trainer_state.json", {"method": "lora", "step": step, "seed": self.cfg.train.seed,
                                                        "world_size": self.mesh.world_size})
        fsync_dir(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        fsync_dir(dest.parent)
        prune_checkpoints(self.output_dir, self.cfg.train.keep_checkpoints)
        logger.info("saved %s", dest)
        return dest

    def _save_optimizer(self, folder: Path) -> None:
        torch.save(self.optim.state_dict(), folder / OPTIM_NAME)

    def close(self) -> None:
        """Release what ``setup`` opened; also after a ``setup`` that raised part-way."""
        try:
            if getattr(self, "handle", None) is not None:
                self.handle.remove()
            if getattr(self, "engine", None) is not None:
                self.engine.close()
        finally:
            if getattr(self, "rt", None) is not None:
                self.close_streamer(self.rt.streamer)
