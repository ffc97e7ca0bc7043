"""The service process: job store + Ray + controller thread + HTTP server, started and stopped together.

``ferrytune serve`` runs :meth:`Service.serve_forever` (uvicorn in the main thread, so
SIGINT / SIGTERM stop it cleanly); tests use :meth:`Service.start` / :meth:`Service.stop`
(uvicorn in a thread) inside a Ray session they own.

An embedded Ray (no ``--address``) is started with a watchdog process beside it, so none
of Ray's processes outlives a killed service by more than a few seconds. With a loopback
``--host`` it binds to loopback too, which needs ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
in the environment before Ray is imported (Ray otherwise replaces 127.0.0.1 by the
machine's routable address): ``ferrytune serve`` sets it; a program embedding
:class:`Service` sets it itself (:data:`LOOPBACK_RAY_ENV`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ferrytune.errors import ConfigError
from ferrytune.service._controller import RAY_NAMESPACE, Controller, ControllerSettings
from ferrytune.service._paths import StateLayout
from ferrytune.service._spec import BaseCatalog
from ferrytune.service._store import JobStore
from ferrytune.service._watchdog import start_watchdog

logger = logging.getLogger(__name__)

__all__ = ["LOOPBACK_HOSTS", "LOOPBACK_RAY_ENV", "Service", "ServiceConfig", "parse_base_args"]

_START_TIMEOUT_S = 30.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
LOOPBACK_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Set before ``import ray``: Ray then keeps 127.0.0.1 as the node address (single machine)."""


@dataclass(frozen=True)
class ServiceConfig:
    state_dir: str
    """jobs, tenant files, checkpoints, adapters and (by default) the SQLite database"""
    bases: dict[str, str]
    """served base models: name -> local HF folder"""
    host: str = "127.0.0.1"
    port: int = 8321
    db_url: str | None = None
    """SQLAlchemy URL of the job store; None = sqlite under state_dir"""
    ray_address: str | None = None
    """a Ray cluster to join; None = start an embedded local Ray (or use the one already initialised)"""
    controller: ControllerSettings = field(default_factory=ControllerSettings)
    """scheduling, and (``tenant_limits``) the per-tenant limits' service-wide defaults"""
    auth_max_failures: int = 20
    """failed authentications one client address may make per ``auth_window_s`` before 429"""
    auth_window_s: float = 60.0
    ray_num_cpus: int | None = None
    """CPUs of an embedded Ray (None: all of the machine's)"""

    def __post_init__(self) -> None:
        if not self.bases:
            raise ConfigError("--base: serve at least one base model (--base NAME=PATH)")
        for name, path in self.bases.items():
            if not (Path(path) / "config.json").is_file():
                raise ConfigError(f"--base {name}={path}: not a Hugging Face model folder (no config.json)")


def parse_base_args(items: list[str]) -> dict[str, str]:
    """``["tiny=/models/tiny", ...]`` -> ``{"tiny": "/models/tiny"}`` (absolute paths)."""
    bases: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--base {item!r}: expected NAME=PATH")
        if name in bases:
            raise ConfigError(f"--base {name}: given twice")
        bases[name] = str(Path(path).expanduser().absolute())
    return bases


def _server_class():
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn, minus re-raising SIGINT / SIGTERM after its graceful shutdown.

        uvicorn re-raises the signal so the default action runs; under Ray's driver handler
        that becomes ``sys.exit(15)``. We stop the controller and workers ourselves after
        ``run()`` returns, and a requested stop exits 0.
        """

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

    return _Server


class Service:
    def __init__(self, config: ServiceConfig):
        self.config = config
        self.layout = StateLayout(config.state_dir)
        self.store: JobStore | None = None
        self.controller: Controller | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self._owns_ray = False
        self._watchdog = None

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def _start_backend(self):
        import ray
        import uvicorn

        from ferrytune.service._api import AuthLimiter, create_app

        self.layout.ensure_root()
        self.store = JobStore.open(self.config.db_url or self.layout.default_db_url)
        self._remove_orphan_job_dirs()
        catalog = BaseCatalog(self.config.bases)
        for name in catalog.names():
            catalog.meta_model(name)  # read each config once now: the first submit stays fast
            catalog.tokenizer(name)
        if not ray.is_initialized():
            if self.config.ray_address:
                ray.init(address=self.config.ray_address, namespace=RAY_NAMESPACE, log_to_driver=True)
            else:
                self._start_embedded_ray(ray)
            self._owns_ray = True
        self.controller = Controller(self.store, catalog, self.layout, self.config.controller)
        self.controller.start()
        app = create_app(self.store, catalog, self.layout, limits=self.config.controller.tenant_limits,
                         worker_limits=self.config.controller.limits(),
                         auth_limiter=AuthLimiter(self.config.auth_max_failures, self.config.auth_window_s))
        config = uvicorn.Config(app, host=self.config.host, port=self.config.port, log_level="warning",
                                access_log=False)
        self._server = _server_class()(config)
        logger.info("ferrytune service on %s: state %s, bases %s", self.url, self.layout.root,
                    ", ".join(f"{k}={v}" for k, v in self.config.bases.items()))

    def _start_embedded_ray(self, ray) -> None:
        self._watchdog = start_watchdog()
        loopback = self.config.host in LOOPBACK_HOSTS
        kwargs = {"_node_ip_address": "127.0.0.1"} if loopback else {}
        ray.init(include_dashboard=False, namespace=RAY_NAMESPACE, num_cpus=self.config.ray_num_cpus, **kwargs)
        node_ip = ray.util.get_node_ip_address()
        if loopback and node_ip not in LOOPBACK_HOSTS:
            logger.warning("embedded Ray listens on %s, not only on loopback: set %s before Ray is imported "
                           "(ferrytune serve does)", node_ip,
                           " ".join(f"{k}={v}" for k, v in LOOPBACK_RAY_ENV.items()))

    def _remove_orphan_job_dirs(self) -> None:
        """Job folders without a job in the store (a submission cut short by a crash) are removed."""
        known = self.store.job_ids()
        for tenant, job_dir in self.layout.job_dirs():
            if job_dir.name.startswith("j-") and job_dir.name not in known:
                logger.info("removing orphan job folder %s of tenant %s", job_dir, tenant)
                shutil.rmtree(job_dir, ignore_errors=True)

    def start(self) -> Service:
        """Start everything, the HTTP server in a thread; returns once it accepts connections."""
        self._start_backend()
        self._thread = threading.Thread(target=self._server.run, name="ferrytune-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"--port {self.config.port}: the HTTP server did not start (port in use?)")
            time.sleep(0.05)
        return self

    def serve_forever(self) -> None:
        """Run until SIGINT / SIGTERM (uvicorn handles them in the main thread)."""
        self._start_backend()
        try:
            print(f"ferrytune service listening on {self.url} (state {self.layout.root}); Ctrl-C stops it",
                  flush=True)
            self._server.run()
            if not self._server.started:
                raise ConfigError(f"--port {self.config.port}: the HTTP server did not start (port in use?)")
        finally:
            self.stop()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.controller is not None:
            self.controller.stop()
            self.controller = None
        if self.store is not None:
            self.store.close()
            self.store = None
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
