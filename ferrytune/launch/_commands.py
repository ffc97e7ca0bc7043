"""What the CLI subcommands do (kept apart from argument parsing)."""

from __future__ import annotations

import logging
from pathlib import Path

from ferrytune.config import config_from_dict, load_config
from ferrytune.errors import ConfigError

logger = logging.getLogger(__name__)


def load_or_demo(args) -> object:
    if args.config:
        return load_config(args.config, args.overrides)
    from ferrytune.launch._demo import DEMO_OUTPUT, prepare_demo

    d = prepare_demo(DEMO_OUTPUT)
    cfg = config_from_dict(d, source="<embedded demo>")
    if args.overrides:
        import tempfile

        import yaml
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(d, f)
        cfg = load_config(f.name, args.overrides)
    logger.info("no config given: running the embedded demo (a tiny LLaMA learning a toy sentiment task) into %s",
                cfg.output_dir)
    return cfg


def train_command(args) -> int:
    cfg = load_or_demo(args)
    if getattr(args, "ray", False):
        from ferrytune.launch._ray import run_on_ray

        return run_on_ray(cfg, address=args.address)
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ferrytune.launch.train import run

    with logging_redirect_tqdm():  # step lines print above the progress bar, not through it
        result = run(cfg, progress=not args.no_progress)
    if result is not None:
        before_after = _eval_before_after(Path(cfg.output_dir) / "metrics.jsonl")
        if before_after:
            print(before_after)
        print(f"final model: {result.final_dir}")
    return 0


def _eval_before_after(metrics_path: Path) -> str | None:
    """``eval accuracy: 0.500 at step 0 -> 0.765 at step 1200`` from a run's metrics.jsonl (None: no evals)."""
    import json

    if not metrics_path.exists():
        return None
    evals = [row for row in map(json.loads, metrics_path.read_text().splitlines()) if "eval_accuracy" in row]
    if len(evals) < 2:
        return None
    first, last = evals[0], evals[-1]
    return (f"eval accuracy: {first['eval_accuracy']:.3f} at step {first['step']} -> "
            f"{last['eval_accuracy']:.3f} at step {last['step']} ({last['eval_samples']} samples)")


def eval_command(args) -> int:
    from ferrytune.launch.train import run_eval

    cfg = load_config(args.config, args.overrides)
    res = run_eval(cfg, checkpoint=args.checkpoint)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))
    if args.output:
        from ferrytune.atomic import write_atomic_json

        write_atomic_json(Path(args.output), {"checkpoint": args.checkpoint or cfg.model.path, **res})
    return 0


def plan_command(args) -> int:
    from ferrytune.engine import build_runtime, lora_runtime_args

    cfg = load_config(args.config, args.overrides)
    extra = lora_runtime_args(cfg) if cfg.method == "lora" else {}  # a backward keeps activations
    rt = build_runtime(cfg.model, cfg.offload, device=cfg.device, **extra)
    layout = rt.layout
    n = sum(p.numel for p in layout.params)
    print(f"model: {cfg.model.path}  params: {n / 1e6:.1f}M  blocks: {len(layout.blocks)} "
          f"(outer + {len(layout.layer_blocks)} layers)  store {rt.store_dtype}  compute {rt.compute_dtype}")
    print(rt.plan.describe())
    return 0


def replay_command(args) -> int:
    from ferrytune.engine import trainer_class

    cfg = load_config(args.config, args.overrides)
    if cfg.method != "zo":
        raise ConfigError(f"method: replay rebuilds zo runs (from zo_log.jsonl); this config is method: {cfg.method}")
    cfg = cfg.model_copy(update={"resume": "never"})
    trainer = trainer_class(cfg)(cfg, read_only=True)  # reads the run's log; writes only OUTPUT_DIR/replayed/
    try:
        trainer.setup()
        dest = trainer.replay(Path(args.log), to_step=args.to_step)
    finally:
        trainer.close()
    print(f"replayed weights: {dest}")
    return 0
