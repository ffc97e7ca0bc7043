"""ZO time to accuracy: dev accuracy against training wall time, plain MeZO beside ferrytune's recipe.

    python benchmarks/bench_zo_time_to_accuracy.py --model DIR --scratch /tmp/tta     # runs both, ~1 h
    python benchmarks/bench_zo_time_to_accuracy.py --plot-only mezo=RUN_DIR recipe=RUN_DIR

Each run is ``ferrytune train`` as a user runs it, on the full rt-polarity train split, evaluated
every ``--eval-every`` steps on the first ``--eval-samples`` dev rows (the split recipes are chosen
on). metrics.jsonl gives each eval line's ``wall_s`` (seconds since set-up) and ``eval_accuracy``;
the step-0 line is the zero-shot baseline. Plain MeZO: full-parameter ZO, ``"{text} It was"``,
lr 1e-6, eps 1e-3 (the previous example). Recipe: ``examples/zo_smollm2_rt_polarity.yaml``.
Prints a table (time to 0.70 / 0.75, best accuracy) and writes JSON and a PNG of the curves.
``--curve NAME:KEY=VALUE,...`` adds a run of the recipe with those settings beside them (an estimator's
curve at the recipe's budget), e.g. ``--curve hizoo-lora:zo.estimator=hizoo,zo.hessian_smooth=1e-4``;
``--only none`` runs the ``--curve`` runs alone (``--plot-only`` then draws them all together).

Estimators at an equal forward budget (``--compare``): each ``NAME[:KEY=VALUE,...]`` is a run with
``zo.estimator=NAME`` and those ``zo.*`` settings (``--zo KEY=VALUE`` applies to every run; ``lr=...``
sets ``train.lr``), trained for ``--forwards F // forwards-per-step`` steps (mezo 2q, fzoo N+1,
hizoo 2q+1) and evaluated at the end; the table gives the first and last train loss and the dev
loss and accuracy after those F forwards:

    python benchmarks/bench_zo_time_to_accuracy.py --model DIR --data DIR --forwards 40 \
        --compare mezo:trainable=all,lr=1e-6 fzoo:trainable=all,num_perturbations=4,lr=1e-8 \
                  mezo:trainable=lora hizoo:trainable=lora,hessian_smooth=1e-6
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import log, machine, print_table, write_json  # noqa: E402

TARGETS = (0.70, 0.75)
PLAIN_MEZO = ["zo.trainable=all", "zo.block_fraction=1", "train.lr=1e-6", "zo.eps=1e-3",
              "train.lr_schedule=constant", 'data.template="{text} It was"',
              'data.verbalizer=[" terrible", " great"]']


def run_one(name: str, overrides: list[str], args) -> Path:
    out = Path(args.scratch) / name
    cmd = [sys.executable, "-m", "ferrytune.launch.cli", "train", str(REPO / "examples/zo_smollm2_rt_polarity.yaml"),
           "--no-progress"]
    sets = [f"model.path={args.model}", f"data.train={args.data}/train.jsonl", f"data.eval={args.data}/dev.jsonl",
            f"data.eval_samples={args.eval_samples}", f"train.eval_every_steps={args.eval_every}",
            f"output_dir={out}", "resume=never", "overwrite=true", *overrides]
    if args.steps:
        sets.append(f"train.steps={args.steps}")
    for s in sets:
        cmd += ["--set", s]
    log(f"{name}: {' '.join(cmd)}")
    subprocess.run(cmd, check=True, cwd=REPO)
    return out


def _forwards_per_step(estimator: str, q: int) -> int:
    return {"mezo": 2 * q, "fzoo": q + 1, "hizoo": 2 * q + 1}[estimator]


def compare_estimators(args) -> int:
    """One run per ``--compare`` item, each at the same number of forwards (see the module docstring)."""
    rows, out_runs = [], {}
    for i, item in enumerate(args.compare):
        est, _, opts = item.partition(":")
        sets = dict(kv.split("=", 1) for kv in args.zo)
        sets.update(kv.split("=", 1) for kv in opts.split(",") if kv)
        lr = sets.pop("lr", None)
        if est == "fzoo":
            sets.setdefault("distribution", "rademacher")
            sets.setdefault("num_perturbations", "4")
        q = int(sets.get("num_perturbations", 1))
        per = _forwards_per_step(est, q)
        steps = max(1, args.forwards // per)
        overrides = [f"zo.estimator={est}", *[f"zo.{k}={v}" for k, v in sets.items()], f"train.steps={steps}",
                     "train.lr_schedule=constant", "train.checkpoint_every_steps=null",
                     f"train.eval_every_steps={steps}"]
        if lr is not None:
            overrides.append(f"train.lr={lr}")
        overrides += args.sets
        name = f"{i}-{est}-{sets.get('trainable', 'lora')}"
        saved_steps, args.steps = args.steps, None
        run_dir = run_one(name, overrides, args)
        args.steps = saved_steps
        recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        train = [r["loss"] for r in recs if "loss" in r]
        evals = [r for r in recs if "eval_loss" in r]
        last = evals[-1] if evals else {}
        rows.append([item, per, steps, per * steps, train[0] if train else None, train[-1] if train else None,
                     evals[0].get("eval_loss") if evals else None, last.get("eval_loss"), last.get("eval_accuracy"),
                     recs[-1].get("wall_s")])
        out_runs[item] = {"run_dir": str(run_dir), "forwards_per_step": per, "steps": steps, "train_loss": train,
                          "eval": evals}
    head = ["run", "fwd/step", "steps", "forwards", "loss first", "loss last", "dev loss 0", "dev loss end",
            "dev acc end", "wall s"]
    print_table(head, rows, title=f"ZO estimators at {args.forwards} forwards (dev rows: {args.eval_samples})")
    write_json(Path(args.out), {"machine": machine(), "forwards": args.forwards, "eval_samples": args.eval_samples,
                                "table": [dict(zip(head, r)) for r in rows], "runs": out_runs})
    log(f"wrote {args.out}")
    return 0


def curve(run_dir: Path) -> list[dict]:
    lines = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [{"step": r["step"], "wall_s": r["wall_s"], "accuracy": r["eval_accuracy"]}
            for r in lines if "eval_accuracy" in r]


def time_to(points: list[dict], target: float) -> float | None:
    return next((p["wall_s"] for p in points if p["accuracy"] >= target), None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "models/SmolLM2-135M-Instruct"))
    p.add_argument("--data", default=str(REPO.parent / "shared/data/rt-polarity"))
    p.add_argument("--scratch", default="bench-tmp/zo_tta", help="run folders go here")
    p.add_argument("--steps", type=int, default=None, help="override train.steps of both runs")
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--only", choices=["mezo", "recipe", "none"], default=None)
    p.add_argument("--curve", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="another run of the recipe with these settings, its curve beside the others (repeatable)")
    p.add_argument("--plot-only", nargs="*", default=None, metavar="NAME=RUN_DIR",
                   help="plot existing runs instead of training")
    p.add_argument("--out", default=str(REPO / "bench-out/zo_time_to_accuracy.json"))
    p.add_argument("--compare", nargs="+", default=None, metavar="ESTIMATOR[:KEY=VALUE,...]",
                   help="compare zo.estimator runs at an equal forward budget instead (module docstring)")
    p.add_argument("--forwards", type=int, default=40, help="--compare: forwards each run may spend")
    p.add_argument("--zo", action="append", default=[], metavar="KEY=VALUE",
                   help="--compare: a zo setting for every run (repeatable), e.g. eps=1e-2")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="--compare: any other setting for every run (repeatable), e.g. train.batch_size=8")
    args = p.parse_args()
    if args.compare:
        return compare_estimators(args)

    if args.plot_only is not None:
        runs = {k: Path(v) for k, v in (item.split("=", 1) for item in args.plot_only)}
    else:
        runs = {}
        if args.only in (None, "mezo"):
            runs["plain MeZO"] = run_one("mezo", PLAIN_MEZO, args)
        if args.only in (None, "recipe"):
            runs["ferrytune recipe"] = run_one("recipe", [], args)
        for item in args.curve:
            name, _, opts = item.partition(":")
            runs[name] = run_one(name, [kv for kv in opts.split(",") if kv], args)
    curves = {name: curve(d) for name, d in runs.items()}
    rows = []
    for name, pts in curves.items():
        best = max(pts, key=lambda q: q["accuracy"]) if pts else None
        rows.append([name, pts[0]["accuracy"] if pts else None,
                     *[time_to(pts, t) for t in TARGETS], best and best["accuracy"], best and best["wall_s"]])
    print_table(["run", "zero-shot", *[f"s to {t:.2f}" for t in TARGETS], "best acc", "at s"], rows,
                title="ZO time to accuracy (dev rows)")
    out = Path(args.out)
    write_json(out, {"machine": machine(), "eval_samples": args.eval_samples, "curves": curves,
                     "time_to": {name: {str(t): time_to(pts, t) for t in TARGETS} for name, pts in curves.items()},
                     "runs": {k: str(v) for k, v in runs.items()}})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        ax.plot([q["wall_s"] / 60 for q in pts], [q["accuracy"] for q in pts], marker="o", label=name)
    for t in TARGETS:
        ax.axhline(t, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("training wall time (min)")
    ax.set_ylabel(f"dev accuracy ({args.eval_samples} rows)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    log(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
