"""``ferrytune serve | tenants | submit | jobs | status | cancel | fetch``.

The project CLI (``ferrytune/launch/cli.py``) calls :func:`add_service_subcommands` on its
subparsers; each subcommand sets ``func`` to its ``*_main(args)``, which returns an exit
code or raises :class:`~ferrytune.errors.FerrytuneError` (the CLI prints it as one line).
``python -m ferrytune.service.cli ...`` runs the same commands on their own.

Examples::

    ferrytune serve --host 127.0.0.1 --port 8321 --state-dir /srv/ft --base smollm2=/models/SmolLM2-135M
    ferrytune tenants add alice --state-dir /srv/ft          # prints alice's token once
    ferrytune tenants rotate alice --state-dir /srv/ft       # a new token; the old one stops working now
    ferrytune tenants revoke alice --state-dir /srv/ft       # alice's token stops working now
    ferrytune tenants limits alice --max-running-jobs 2 --state-dir /srv/ft
    export FERRYTUNE_URL=http://127.0.0.1:8321 FERRYTUNE_TOKEN=ftk_...
    ferrytune submit job.yaml                                 # prints the job id
    ferrytune status j-0123456789abcdef --json
    ferrytune fetch j-0123456789abcdef ./adapter              # a PEFT folder
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ferrytune.errors import ConfigError, FerrytuneError

__all__ = [
    "add_service_subcommands",
    "cancel_main",
    "fetch_main",
    "jobs_main",
    "main",
    "serve_main",
    "status_main",
    "submit_main",
    "tenants_main",
]


def _client(args: argparse.Namespace):
    from ferrytune.service._client import Client

    return Client(args.url or os.environ.get("FERRYTUNE_URL", ""), args.token or os.environ.get("FERRYTUNE_TOKEN", ""))


_LIMIT_FLAGS = {  # TenantLimits field -> (flag, unit multiplier, help)
    "max_jobs": ("--max-jobs", 1, "jobs a tenant may have queued or running at once"),
    "max_running_jobs": ("--max-running-jobs", 1, "jobs of a tenant on workers at once"),
    "max_steps": ("--max-steps", 1, "train.steps of one job"),
    "max_tokens_per_step": ("--max-tokens-per-step", 1, "train.batch_size x data.max_length of one job"),
    "max_dataset_bytes": ("--max-dataset-mib", 1 << 20, "one uploaded dataset, MiB"),
    "max_disk_bytes": ("--max-disk-gib", 1 << 30, "everything in a tenant's area, GiB"),
}


def _limit_args(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    from ferrytune.service._limits import TenantLimits

    base = TenantLimits()
    for name, (flag, unit, text) in _LIMIT_FLAGS.items():
        default = getattr(base, name) // unit
        p.add_argument(flag, type=int, default=default if defaults else None, dest=name,
                       help=f"{text} (default {default})" if defaults else text)


def _limits_from(args: argparse.Namespace) -> dict[str, int | None]:
    return {name: None if getattr(args, name) is None else getattr(args, name) * unit
            for name, (_, unit, _) in _LIMIT_FLAGS.items()}


_POSITIVE_FLAGS = {  # serve flag -> (attribute, smallest value allowed)
    "--worker-memory-gib": ("worker_memory_gib", 1e-9), "--max-workers": ("max_workers", 0),  # 0: accept and queue, train nowhere
    "--max-jobs-per-worker": ("max_jobs_per_worker", 1), "--token-capacity": ("token_capacity", 1),
    "--min-slice-s": ("min_slice_s", 0), "--checkpoint-every-steps": ("checkpoint_every_steps", 1),
    "--eval-slice-s": ("eval_slice_s", 0),
    "--worker-cpus": ("worker_cpus", 1e-9), "--base-host-budget-gib": ("base_host_budget_gib", 1e-9),
    "--auth-max-failures": ("auth_max_failures", 1), "--auth-window-s": ("auth_window_s", 1e-9),
}


def check_serve_args(args: argparse.Namespace) -> dict | None:
    """Every ``serve`` flag checked before anything starts (one line naming the flag); returns the
    streamed base's offload settings (None: resident), as each worker will build them."""
    for flag, (attr, low) in _POSITIVE_FLAGS.items():
        value = getattr(args, attr)
        if value is None or value < low:
            raise ConfigError(f"{flag}: must be {'> 0' if low and low < 1 else f'>= {low}'} (got {value})")
    if args.ray_cpus is not None and args.ray_cpus < 1:
        raise ConfigError(f"--ray-cpus: must be >= 1 (got {args.ray_cpus})")
    for name, (flag, _, _) in _LIMIT_FLAGS.items():
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise ConfigError(f"{flag}: must be >= 0 (got {getattr(args, name)})")
    if args.base_tier == "resident":
        return None
    if args.base_tier == "nvme" and not args.base_nvme_dir:
        raise ConfigError("--base-nvme-dir is required with --base-tier nvme")
    offload = {"tier": args.base_tier, "nvme_dir": args.base_nvme_dir, "host_budget_gib": args.base_host_budget_gib}
    from pydantic import ValidationError

    from ferrytune.config import OffloadConfig

    try:
        OffloadConfig(**offload)  # what each worker builds: a bad value fails here, not in every job
    except ValidationError as e:
        err = e.errors()[0]
        flag = "--base-" + str(err["loc"][0]).replace("_", "-") if err.get("loc") else "--base-tier"
        raise ConfigError(f"{flag}: {err['msg']}") from None
    return offload


def serve_main(args: argparse.Namespace) -> int:
    base_offload = check_serve_args(args)
    if args.host in ("127.0.0.1", "localhost", "::1") and not args.address:
        # before Ray is imported: keep the embedded Ray on loopback (see _service.LOOPBACK_RAY_ENV)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.umask(0o077)  # the state dir is private to the service's user (files 0600, folders 0700)
    from ferrytune.service._controller import ControllerSettings
    from ferrytune.service._limits import TenantLimits
    from ferrytune.service._service import Service, ServiceConfig, parse_base_args

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ControllerSettings(
        worker_memory_gib=args.worker_memory_gib, max_workers=args.max_workers,
        max_jobs_per_worker=args.max_jobs_per_worker, token_capacity=args.token_capacity, packing=args.packing,
        min_slice_s=args.min_slice_s, checkpoint_every_steps=args.checkpoint_every_steps,
        eval_slice_s=args.eval_slice_s,
        worker_num_cpus=args.worker_cpus, base_store_dtype=args.base_store_dtype,
        tenant_limits=TenantLimits(**_limits_from(args)), base_offload=base_offload)
    config = ServiceConfig(state_dir=args.state_dir, bases=parse_base_args(args.base), host=args.host,
                           port=args.port, db_url=args.db, ray_address=args.address, controller=settings,
                           auth_max_failures=args.auth_max_failures, auth_window_s=args.auth_window_s,
                           ray_num_cpus=args.ray_cpus)
    Service(config).serve_forever()
    return 0


def tenants_main(args: argparse.Namespace) -> int:
    from ferrytune.service._paths import StateLayout
    from ferrytune.service._store import JobStore, TenantError

    layout = StateLayout(args.state_dir)
    layout.ensure_root()
    store = JobStore.open(args.db or layout.default_db_url)
    try:
        if args.tenants_command == "add":
            token = store.add_tenant(args.name, weight=args.weight)
            layout.ensure_tenant(args.name)
            print(f"tenant {args.name!r} created; its API token (shown only now):", file=sys.stderr)
            print(token)
        elif args.tenants_command == "rotate":
            token = store.rotate_token(args.name)
            print(f"tenant {args.name!r}: new API token (shown only now); the old one no longer works:",
                  file=sys.stderr)
            print(token)
        elif args.tenants_command == "revoke":
            store.revoke_token(args.name)
            print(f"tenant {args.name!r}: API token revoked ('ferrytune tenants rotate' issues a new one)",
                  file=sys.stderr)
        elif args.tenants_command == "limits":
            changes = {k: v for k, v in _limits_from(args).items() if v is not None}
            changes.update({k: None for k in args.clear or []})
            if changes:
                own = store.set_limits(args.name, changes)
            elif (record := store.tenant(args.name)) is not None:
                own = record.overrides
            else:
                raise TenantError(f"tenant {args.name!r}: no such tenant")
            print(f"tenant {args.name!r} limits: " + (", ".join(f"{k}={v}" for k, v in sorted(own.items()))
                                                     or "the service's defaults"))
        else:
            for t in store.tenants():
                revoked = "\trevoked" if t.revoked else ""
                own = ", ".join(f"{k}={v}" for k, v in sorted(t.overrides.items()))
                print(f"{t.name}\tweight {t.weight:g}{revoked}" + (f"\tlimits {own}" if own else ""))
    finally:
        store.close()
    return 0


def submit_main(args: argparse.Namespace) -> int:
    job = _client(args).submit(args.spec)
    print(json.dumps(job) if args.json else job["id"])
    return 0


def jobs_main(args: argparse.Namespace) -> int:
    jobs = _client(args).jobs()
    if args.json:
        print(json.dumps(jobs, indent=1))
        return 0
    print(f"{'ID':<20} {'STATE':<10} {'STEP':>11} {'LOSS':>8}  NAME")
    for j in jobs:
        loss = "" if j["loss"] is None else f"{j['loss']:.4f}"
        print(f"{j['id']:<20} {j['state']:<10} {j['step']:>5}/{j['max_steps']:<5} {loss:>8}  {j['name']}")
    return 0


def status_main(args: argparse.Namespace) -> int:
    job = _client(args).status(args.id)
    if args.json:
        print(json.dumps(job))
    else:
        loss = "" if job["loss"] is None else f"  loss {job['loss']:.4f}"
        ev = "" if job.get("eval_step") is None else (
            f"  eval_accuracy {job['eval_accuracy']:.4f}  eval_loss {job['eval_loss']:.4f}"
            f" (step {job['eval_step']}, {job['eval_samples']} samples)")
        error = f"  error: {job['error']}" if job["error"] else ""
        print(f"{job['id']}  {job['state']}  step {job['step']}/{job['max_steps']}{loss}{ev}{error}")
    return 0


def cancel_main(args: argparse.Namespace) -> int:
    job = _client(args).cancel(args.id)
    print(f"{job['id']}: cancel requested (state {job['state']})")
    return 0


def fetch_main(args: argparse.Namespace) -> int:
    written = _client(args).fetch(args.id, args.dir)
    print(f"wrote {len(written)} files of {args.id}'s adapter to {Path(args.dir)}")
    return 0


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="service URL (default: $FERRYTUNE_URL)")
    p.add_argument("--token", default=None, help="API token (default: $FERRYTUNE_TOKEN)")


def add_service_subcommands(subparsers) -> None:
    """Register serve, tenants, submit, jobs, status, cancel and fetch (each sets ``func``)."""
    p = subparsers.add_parser("serve", help="run the multi-tenant LoRA service (HTTP API + Ray workers)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8321)
    p.add_argument("--state-dir", required=True, help="jobs, tenant files, checkpoints, adapters, the database")
    p.add_argument("--base", action="append", required=True, metavar="NAME=PATH",
                   help="a served base model (repeatable); tenants name it in 'model:'")
    p.add_argument("--address", default=None, help="Ray cluster address; default: an embedded local Ray")
    p.add_argument("--db", default=None, help="SQLAlchemy URL of the job store, e.g. "
                   "postgresql+psycopg://user:pw@host/db; default: sqlite in --state-dir")
    p.add_argument("--worker-memory-gib", type=float, default=8.0, help="memory model budget of one worker")
    p.add_argument("--max-workers", type=int, default=1, help="worker actors alive at once")
    p.add_argument("--max-jobs-per-worker", type=int, default=8, help="adapters packed on one worker")
    p.add_argument("--token-capacity", type=int, default=4096, help="padded tokens per packed microbatch")
    p.add_argument("--packing", action="store_true",
                   help="pack each microbatch's sequences end to end, no padding (capacity then counts real tokens)")
    p.add_argument("--min-slice-s", type=float, default=300.0, help="run time before a fair-share preemption")
    p.add_argument("--checkpoint-every-steps", type=int, default=20, help="per-job checkpoint period")
    p.add_argument("--eval-slice-s", type=float, default=0.05,
                   help="eval forwards a worker runs between two packed steps (at least one): what a job's "
                        "evaluation delays its neighbours' steps")
    p.add_argument("--worker-cpus", type=float, default=1.0, help="Ray CPUs (and torch threads) per worker")
    p.add_argument("--base-tier", choices=["resident", "host", "nvme"], default="resident",
                   help="where each worker keeps its base: resident, or streamed from host memory / NVMe")
    p.add_argument("--base-nvme-dir", default=None, help="block store directory (one subfolder per worker)")
    p.add_argument("--base-host-budget-gib", type=float, default=4.0, help="host buffer budget of a streamed base")
    p.add_argument("--base-store-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="dtype of the streamed base's blocks")
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the embedded Ray (default: all)")
    p.add_argument("--auth-max-failures", type=int, default=20,
                   help="failed authentications per client address per --auth-window-s before 429")
    p.add_argument("--auth-window-s", type=float, default=60.0)
    limits = p.add_argument_group("per-tenant limits (defaults; 'ferrytune tenants limits' overrides them per tenant)")
    _limit_args(limits, defaults=True)
    p.set_defaults(func=serve_main)

    p = subparsers.add_parser("tenants", help="manage the service's tenants (run on the service host)")
    sub = p.add_subparsers(dest="tenants_command", required=True)
    add = sub.add_parser("add", help="create a tenant and print its API token once")
    add.add_argument("name")
    add.add_argument("--state-dir", required=True)
    add.add_argument("--db", default=None)
    add.add_argument("--weight", type=float, default=1.0, help="fair-share weight")
    lst = sub.add_parser("list", help="list tenants")
    lst.add_argument("--state-dir", required=True)
    lst.add_argument("--db", default=None)
    for name, text in (("rotate", "issue a new API token (printed once); the old one stops working at once"),
                       ("revoke", "the tenant's API token stops working at once")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("name")
        cmd.add_argument("--state-dir", required=True)
        cmd.add_argument("--db", default=None)
    lim = sub.add_parser("limits", help="show or override a tenant's limits (the service's flags are the defaults)")
    lim.add_argument("name")
    lim.add_argument("--state-dir", required=True)
    lim.add_argument("--db", default=None)
    _limit_args(lim, defaults=False)
    lim.add_argument("--clear", action="append", choices=sorted(_LIMIT_FLAGS), metavar="LIMIT",
                     help="drop an override (back to the service's default); repeatable")
    p.set_defaults(func=tenants_main)

    p = subparsers.add_parser("submit", help="upload a job spec and the dataset it names; prints the job id")
    p.add_argument("spec", help="job spec YAML (the LoRA config with 'model: NAME')")
    p.add_argument("--json", action="store_true")
    _client_args(p)
    p.set_defaults(func=submit_main)

    p = subparsers.add_parser("jobs", help="list your jobs")
    p.add_argument("--json", action="store_true")
    _client_args(p)
    p.set_defaults(func=jobs_main)

    for name, func, text in (("status", status_main, "a job's state and progress"),
                             ("cancel", cancel_main, "cancel a job")):
        p = subparsers.add_parser(name, help=text)
        p.add_argument("id")
        if name == "status":
            p.add_argument("--json", action="store_true")
        _client_args(p)
        p.set_defaults(func=func)

    p = subparsers.add_parser("fetch", help="download a finished job's PEFT adapter into DIR")
    p.add_argument("id")
    p.add_argument("dir")
    _client_args(p)
    p.set_defaults(func=fetch_main)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ferrytune", description="ferrytune service commands")
    add_service_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FerrytuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
