"""``ferrytune train CONFIG --ray [--address ADDR]``: the same ranks, started by Ray Train.

Ray Train's ``TorchTrainer`` starts ``parallel.data x parallel.perturbation``
workers, sets up the ``torch.distributed`` process group among them (gloo on
CPU, nccl with ``use_gpu``) and calls :func:`_worker` on each; the worker runs
exactly the torchrun code path, :func:`ferrytune.launch.train.run`, whose
``init_mesh`` adopts the group Ray made. So a job behaves the same under either
launcher, and a Ray run equals a torchrun run bit for bit.

Without ``address`` an embedded local Ray is started (and stopped afterwards)
with one CPU per rank plus one for Ray Train's controller; with an address the
job joins that cluster (``auto`` for the cluster this machine belongs to).
The ``ferrytune`` package is shipped to the workers with the job
(``py_modules``), so cluster nodes need only the dependencies installed.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from ferrytune.errors import DistributedError

logger = logging.getLogger(__name__)

RAY_TIMEOUT_S = 300  # collective timeout of the process group Ray Train builds


def run_on_ray(cfg, *, address: str | None = None, collective_timeout_s: float = RAY_TIMEOUT_S) -> int:
    """Run the training job ``cfg`` on Ray Train; returns 0 on success, raises DistributedError otherwise."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    import ferrytune

    num_workers = cfg.parallel.data * cfg.parallel.perturbation
    use_gpu = cfg.device == "cuda"
    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if use_gpu else "gloo")
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, runtime_env={"py_modules": [str(Path(ferrytune.__file__).parent)]})
        else:
            ray.init(num_cpus=num_workers + 1, include_dashboard=False,
                     runtime_env={"py_modules": [str(Path(ferrytune.__file__).parent)]})
        started = True
    output = Path(cfg.output_dir).resolve()
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": cfg.to_dict()},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend=backend, timeout_s=int(collective_timeout_s)),
        run_config=RunConfig(name=f"ferrytune-{uuid.uuid4().hex[:8]}", storage_path=str(output / "ray"),
                             failure_config=FailureConfig(max_failures=0)),
    )
    logger.info("starting %d Ray Train worker(s) (%s, backend %s)", num_workers, address or "embedded local Ray", backend)
    try:
        trainer.fit()
    except Exception as e:  # Ray wraps a worker's exception in its own error types
        raise DistributedError(f"the Ray Train run failed: {_root_message(e)}") from e
    finally:
        if started:
            ray.shutdown()
    logger.info("final model: %s", output / "final")
    return 0


def _worker(loop_config: dict) -> None:
    """One Ray Train worker: the torchrun path, with the process group Ray already set up."""
    from ferrytune.config import config_from_dict
    from ferrytune.launch._logging import setup_logging
    from ferrytune.launch.train import run

    setup_logging(False)
    run(config_from_dict(loop_config["config"], source="<ray job>"), progress=False)


def _root_message(e: BaseException) -> str:
    """The innermost cause's first line (a worker's FerrytuneError rather than Ray's wrapper)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        nxt = e.__cause__ or getattr(e, "cause", None)
        if not isinstance(nxt, BaseException):
            errors = getattr(e, "worker_failures", None)  # Ray Train v2 WorkerGroupError
            nxt = next(iter(errors.values()), None) if isinstance(errors, dict) and errors else None
        if not isinstance(nxt, BaseException):
            break
        e = nxt
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"
