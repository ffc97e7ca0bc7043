"""Training entry point for one process or a torchrun launch.

    ferrytune train CONFIG.yaml
    torchrun --nproc-per-node 2 -m ferrytune.launch.train CONFIG.yaml   # data parallel over the 2 processes
    torchrun --nproc-per-node 2 -m ferrytune.launch.train CONFIG.yaml --set parallel.perturbation=2
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m ferrytune.launch.train CONFIG.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys

from ferrytune.errors import FerrytuneError

logger = logging.getLogger(__name__)


def run(cfg, *, progress: bool = True, collective_timeout_s: float | None = None):
    """Train according to ``cfg`` in this process (one rank of the mesh in the environment).

    ``collective_timeout_s``: how long a rank waits on its peers before failing
    (default ``ferrytune.parallel.COLLECTIVE_TIMEOUT_S``).
    """
    from ferrytune.engine import check_device, trainer_class
    from ferrytune.config import resolve_world_size
    from ferrytune.parallel import COLLECTIVE_TIMEOUT_S, init_mesh, launched_world_size, shutdown

    check_device(cfg)
    cfg = resolve_world_size(cfg, launched_world_size())  # no parallel.* set: data parallel over every process
    mesh = init_mesh(cfg.parallel, device=cfg.device, timeout_s=collective_timeout_s or COLLECTIVE_TIMEOUT_S)
    try:
        trainer = trainer_class(cfg)(cfg, mesh=mesh)
        try:  # close() also after a setup() that raised part-way (its streamer's threads and files)
            trainer.setup()
            return trainer.train(progress=progress)
        finally:
            trainer.close()
    finally:
        shutdown(mesh)


def run_eval(cfg, *, checkpoint: str | None = None) -> dict:
    """Evaluate on ``data.eval``: full weights (an HF folder) or, for LoRA configs, a PEFT adapter.

    Read-only: the run folder of ``cfg`` (``output_dir``) is left as it is, also while it trains."""
    from ferrytune.engine import LoraTrainer, ZOTrainer
    from ferrytune.errors import ConfigError

    if not cfg.data.eval:
        raise ConfigError("data.eval: set an evaluation file to run ferrytune eval")
    lora = cfg.method == "lora" or cfg.zo.trainable == "lora"
    Trainer = LoraTrainer if lora else ZOTrainer
    if lora:
        if checkpoint:  # a PEFT adapter folder on top of model.path
            cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"init_from": checkpoint})})
    else:
        if checkpoint:  # an HF model folder
            cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": checkpoint})})
    cfg = cfg.model_copy(update={"resume": "never", "method": "lora" if lora else "zo"})
    trainer = Trainer(cfg, read_only=True)  # writes nothing into (removes nothing from) output_dir
    try:
        trainer.setup()
        return trainer.evaluate()
    finally:
        trainer.close()


def main(argv: list[str] | None = None) -> int:
    from ferrytune.config import load_config
    from ferrytune.launch._logging import setup_logging

    p = argparse.ArgumentParser(prog="python -m ferrytune.launch.train")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--debug", action="store_true")
    p.add_argument("--collective-timeout-s", type=float, default=None,
                   help="seconds a rank waits on its peers before failing (default 300)")
    args = p.parse_args(argv)
    setup_logging(args.debug)
    try:
        run(load_config(args.config, args.overrides), progress=False, collective_timeout_s=args.collective_timeout_s)
    except FerrytuneError as e:
        if args.debug:
            raise
        print(f"ferrytune: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
