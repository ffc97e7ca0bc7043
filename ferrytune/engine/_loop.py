"""The step loop every trainer shares: metrics, progress, eval/checkpoint cadence, agreement checks.

A trainer subclasses :class:`StepLoop` and provides ``train_step(step) -> StepResult``,
``evaluate``, ``save_checkpoint`` and ``save_final``; the loop owns what happens
between steps, in this order: metrics line -> agreement check -> eval -> checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ferrytune.engine._metrics import device_metrics, format_line, host_rss_gib, stream_delta

logger = logging.getLogger(__name__)

RUN_FILES = ("metrics.jsonl", "zo_log.jsonl", "checkpoints", "final", "config.json")
"""What a training run writes into ``output_dir`` (and ``overwrite`` removes)."""


@dataclass
class StepResult:
    loss: float
    lr: float
    tokens: int  # tokens this rank processed in the step (all streams)
    extra: dict = field(default_factory=dict)  # extra metrics (e.g. the projected gradient)


@dataclass
class TrainResult:
    final_dir: Path
    steps: int
    losses: list[float]
    eval: dict | None


class StepLoop:
    """Base of the trainers: shared set-up pieces and ``train()``; see the module docstring for the hooks."""

    method = "?"
    show_progress = True  # progress bars on the main rank (``train(progress=False)`` turns them off)

    def __init__(self, cfg, *, mesh=None, read_only: bool = False) -> None:
        """``read_only``: evaluation (``ferrytune eval``, ``replay``) of weights named by the config; the
        trainer then writes nothing into ``output_dir`` and removes nothing from it, so a run's
        folder, even one still training, is left byte for byte as it was."""
        from ferrytune.parallel import Mesh

        self.cfg = cfg
        self.mesh = mesh or Mesh()
        self.output_dir = Path(cfg.output_dir)
        self.read_only = read_only

    def nvme_subdir(self) -> str | None:
        """This process's own folder under ``offload.nvme_dir``: one per rank, and one per evaluating
        process, so that an evaluation never rebuilds (deletes) the store a training run streams from."""
        parts = [f"rank{self.mesh.rank}"] if self.mesh.distributed else []
        if self.read_only:
            parts.append(f"eval-{os.getpid()}")
        return "/".join(parts) or None

    def _resolve_resume(self, method: str) -> None:
        """Sets ``ckpt`` (or None) and ``start_step`` from ``resume``; refuses another method's checkpoint,
        and a fresh start over a run already in ``output_dir`` unless ``overwrite`` says so."""
        from ferrytune.engine._checkpoint import read_state, resolve_resume
        from ferrytune.errors import CheckpointError

        self.start_step = 0
        if self.read_only:
            self.ckpt = None
            return
        self.ckpt = resolve_resume(self.output_dir, self.cfg.resume)
        if self.ckpt is None:
            self._claim_output_dir()
        if self.ckpt is not None:
            state = read_state(self.ckpt)
            if state.get("method") != method:
                raise CheckpointError(f"{self.ckpt}: not a {method} checkpoint (method {state.get('method')})")
            self.start_step = int(state["step"])
            logger.info("resuming from %s at step %d", self.ckpt, self.start_step)

    def close_streamer(self, streamer) -> None:
        """Close ``streamer``; an evaluating process also deletes the store it built for itself."""
        try:
            streamer.close()
        finally:
            if self.read_only and streamer.nvme_dir is not None:
                from ferrytune.offload import NvmeBlockStore

                NvmeBlockStore.remove(streamer.nvme_dir)
                with contextlib.suppress(OSError):  # only if nothing else is in it
                    streamer.nvme_dir.rmdir()

    def _claim_output_dir(self) -> None:
        """A fresh start (step 0): refuse to start over a run in ``output_dir`` unless ``overwrite``,
        then clear that run's files (only those: the folder may hold other things)."""
        import shutil

        from ferrytune.errors import ConfigError

        found = [n for n in RUN_FILES if (self.output_dir / n).exists()]
        if not found:
            return
        if not self.cfg.overwrite:
            raise ConfigError(
                f"output_dir: {self.output_dir} already holds a run ({', '.join(found)}); resume: auto continues "
                "it, another output_dir starts beside it, or overwrite: true replaces it")
        if self.mesh.is_main:
            logger.warning("overwrite: removing the previous run's %s from %s", ", ".join(found), self.output_dir)
            for n in found:
                path = self.output_dir / n
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def _setup_data(self) -> None:
        """Tokenizer, examples, the step-indexed batcher, the metrics file and the resolved config."""
        import json

        from ferrytune.data import Batcher, load_examples, load_tokenizer, pad_id_for
        from ferrytune.engine._metrics import MetricsWriter

        cfg, mesh, t = self.cfg, self.mesh, self.cfg.train
        self.tokenizer = load_tokenizer(cfg.model.path)
        self.pad_id = pad_id_for(self.tokenizer)
        self.train_examples, self.eval_examples = load_examples(cfg.data, self.tokenizer)
        self.batcher = Batcher(self.train_examples, global_batch_size=t.batch_size,
                               micro_batch_size=t.micro_batch_size, seed=t.seed, shuffle=cfg.data.shuffle,
                               rank=mesh.dp_rank, world_size=mesh.data)
        writes = mesh.is_main and not self.read_only
        self.metrics = MetricsWriter(self.output_dir, enabled=writes, start_step=self.start_step)
        if writes:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(cfg.model_dump(), indent=2))

    def train(self, *, progress: bool = True) -> TrainResult:
        t, mesh = self.cfg.train, self.mesh
        losses = []
        self.show_progress = progress
        if self.start_step == 0 and self.eval_examples:  # the zero-shot baseline, at wall_s ~ 0
            self.metrics.write({"step": 0, **self.evaluate(prefix="eval_")})
        bar = _progress(t.steps, self.start_step, desc=self.method, enabled=progress and mesh.is_main)
        for step in range(self.start_step, t.steps):
            t0 = time.perf_counter()
            before = self.rt.streamer.stats.snapshot()
            res = self.train_step(step)
            if not math.isfinite(res.loss):
                raise FloatingPointError(f"step {step}: non-finite loss; lower train.lr (or zo.eps)")
            dt = time.perf_counter() - t0
            cur, peak = host_rss_gib()
            rec = {"step": step + 1, "loss": res.loss, **res.extra, "lr": res.lr, "step_s": round(dt, 4),
                   "tokens_per_s": res.tokens / dt, "host_rss_gib": round(cur, 4), "host_peak_rss_gib": round(peak, 4)}
            rec.update(stream_delta(before, self.rt.streamer.stats.snapshot()))
            rec.update(device_metrics(self.rt.device))
            losses.append(res.loss)
            if (step + 1) % t.log_every_steps == 0:
                self.metrics.write(rec)
                if mesh.is_main:
                    logger.info(format_line(rec))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{res.loss:.4f}")
            last = step + 1 == t.steps
            if self.agree.due(step + 1) and not last:
                self.check_agreement(step + 1)
            if t.eval_every_steps and (step + 1) % t.eval_every_steps == 0 and not last:
                self.metrics.write({"step": step + 1, **self.evaluate(prefix="eval_")})
            if t.checkpoint_every_steps and (step + 1) % t.checkpoint_every_steps == 0 and not last:
                self.save_checkpoint(step + 1)
        if bar is not None:
            bar.close()
        self.before_final()
        self.check_agreement(t.steps)
        ev = self.evaluate(prefix="eval_") if self.eval_examples else None
        if ev:
            self.metrics.write({"step": t.steps, **ev})
        final = self.output_dir / "final"
        self.save_final(final)
        return TrainResult(final, t.steps, losses, ev)

    def _eval_result(self, totals, prefix: str) -> dict:
        """Sum (loss, correct, count) over ranks into the eval metrics, and log them."""
        from ferrytune.parallel import all_reduce_sum_

        all_reduce_sum_(totals, self.mesh)
        loss, correct, count = totals.tolist()
        res = {f"{prefix}loss": loss / count, f"{prefix}accuracy": correct / count, f"{prefix}samples": int(count)}
        if self.mesh.is_main:
            logger.info("eval: loss %.4f accuracy %.4f on %d samples", loss / count, correct / count, int(count))
        return res

    def eval_progress(self, chunks: list):
        """Iterate an evaluation's ``chunks`` showing progress like training: a bar on the main rank,
        and a log line every 30 s (a 1,000-row evaluation on a CPU takes minutes)."""
        bar = _progress(len(chunks), 0, desc="eval", enabled=self.show_progress and self.mesh.is_main, unit="batch")
        t0 = last = time.perf_counter()
        for i, chunk in enumerate(chunks):
            yield chunk
            if bar is not None:
                bar.update(1)
            now = time.perf_counter()
            if self.mesh.is_main and now - last >= 30:
                logger.info("eval: %d/%d batches in %.0f s", i + 1, len(chunks), now - t0)
                last = now
        if bar is not None:
            bar.close()

    def before_final(self) -> None:
        """Work that must precede the final check, eval and save (ZO: flush the pending update)."""


def _progress(total: int, start: int, *, desc: str, enabled: bool, unit: str = "step"):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit=unit, dynamic_ncols=True, leave=desc != "eval")
