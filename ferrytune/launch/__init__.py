"""Entry points: the ``ferrytune`` CLI, one process or a torchrun rank, a Ray Train launch.

* :func:`main` — ``ferrytune train|plan|eval|replay|serve|...`` (``launch/cli.py``);
* :func:`run` / :func:`run_eval` — train or evaluate a config in this process (``launch/train.py``,
  also ``python -m ferrytune.launch.train`` under torchrun);
* :func:`run_on_ray` — the same ranks started by Ray Train (``launch/_ray.py``; Ray imported lazily);
* :func:`setup_logging` — the log format every entry point shares.
"""

from ferrytune.launch._logging import setup_logging
from ferrytune.launch.cli import main

# ``launch.train`` is imported on first use, not here: ``python -m ferrytune.launch.train`` (torchrun)
# imports this package first, and a submodule already in sys.modules would run twice.


def run(cfg, **kw):
    """Train ``cfg`` in this process (one rank of the mesh in the environment); see ``launch/train.py``."""
    from ferrytune.launch.train import run as _run

    return _run(cfg, **kw)


def run_eval(cfg, **kw) -> dict:
    """Evaluate ``cfg``'s weights on ``data.eval``, read-only; see ``launch/train.py``."""
    from ferrytune.launch.train import run_eval as _run_eval

    return _run_eval(cfg, **kw)


def run_on_ray(cfg, *, address: str | None = None) -> int:
    """Run ``cfg`` on Ray Train (imported lazily: Ray is an optional dependency)."""
    from ferrytune.launch._ray import run_on_ray as _run

    return _run(cfg, address=address)


__all__ = ["main", "run", "run_eval", "run_on_ray", "setup_logging"]
