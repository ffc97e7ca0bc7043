"""A throwaway PostgreSQL server for the job-store tests: initdb + pg_ctl in a temp dir.

It listens on a unix socket in its own folder only (``listen_addresses=''``: no TCP), with
trust authentication: only its owner (and root) can reach the socket. initdb refuses to
run as root, so as root the server runs as the ``postgres`` system user (the folder is
chowned to it). Durability is off (``fsync=off``): the tests never crash the server, and
it is deleted at the end. ``FERRYTUNE_TEST_POSTGRES_URL`` (a URL of a server where its
user may create databases) replaces it.

:meth:`PostgresServer.stop` stops the server and deletes its folder (the session fixture
calls it on every exit path pytest runs teardown on). For the paths it does not (the test
process killed by SIGKILL or SIGTERM), a guard process holds the read end of a pipe from the
test process: when the pipe closes without a ``stop`` line, it stops the server
(``pg_ctl stop -m immediate``) and deletes the folder. Run as ``python postgres_testlib.py
--guard ROOT BIN_DIR UID GID``.

A plain module with a unique name (test folders have no __init__.py).
"""

from __future__ import annotations

import glob
import importlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid

import sqlalchemy as sa

ENV_URL = "FERRYTUNE_TEST_POSTGRES_URL"
ENV_REQUIRE = "FERRYTUNE_REQUIRE_POSTGRES"
_PORT = 5432  # names the socket file only: the server listens on no TCP port
_USER = "ferrytune"


class PostgresUnavailable(Exception):
    """No server can be started or reached here (the reason is the message)."""


def find_bin_dir() -> str:
    """The folder of initdb and pg_ctl: on PATH, else the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return os.path.dirname(found)
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0)
    if not candidates:
        raise PostgresUnavailable("no PostgreSQL server here (initdb not on PATH nor in /usr/lib/postgresql/*/bin; "
                                  "apt-get install postgresql)")
    return os.path.dirname(candidates[-1])


class PostgresServer:
    """A server of one's own, or the one ``FERRYTUNE_TEST_POSTGRES_URL`` names; makes a database per test."""

    def __init__(self, admin_url: str, *, root: str | None = None, bin_dir: str | None = None,
                 run_as: pwd.struct_passwd | None = None):
        self.admin_url = sa.engine.make_url(admin_url)
        self.root, self.bin_dir, self.run_as = root, bin_dir, run_as
        self._guard: subprocess.Popen | None = None
        self._admin = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)

    # ---- lifecycle ----
    @classmethod
    def start(cls) -> PostgresServer:
        """The server of ``FERRYTUNE_TEST_POSTGRES_URL``, else a new one; PostgresUnavailable if neither."""
        try:
            importlib.import_module("psycopg")  # the driver the store uses
        except ImportError as e:
            raise PostgresUnavailable(f"psycopg is not installed ({e}): pip install 'ferrytune[postgres]'") from None
        if os.environ.get(ENV_URL):
            server = cls(os.environ[ENV_URL])
            server._check()
            return server
        bin_dir = find_bin_dir()
        run_as = None
        if os.geteuid() == 0:
            try:
                run_as = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root and there is no 'postgres' user to run the server as "
                                          "(initdb refuses root)") from None
        root = tempfile.mkdtemp(prefix="ferrytune-pg-")  # short: a socket path has at most 107 bytes
        server = guard = None
        try:
            if run_as is not None:
                os.chown(root, run_as.pw_uid, run_as.pw_gid)
            guard = _start_guard(root, bin_dir, run_as)
            data, log = os.path.join(root, "data"), os.path.join(root, "server.log")
            _run(run_as, [os.path.join(bin_dir, "initdb"), "-D", data, "-U", _USER, "--auth=trust", "-E", "UTF8",
                          "--locale=C", "--no-sync"], what="initdb")
            options = (f"-k {root} -p {_PORT} -c listen_addresses='' -c fsync=off -c synchronous_commit=off "
                       "-c full_page_writes=off -c max_connections=200")
            server = cls(f"postgresql+psycopg://{_USER}@/postgres?host={root}&port={_PORT}", root=root,
                         bin_dir=bin_dir, run_as=run_as)
            server._guard, guard = guard, None
            _run(run_as, [os.path.join(bin_dir, "pg_ctl"), "-D", data, "-l", log, "-w", "-t", "60", "-o", options,
                          "start"], what="pg_ctl start", log=log)
            server._check()
            return server
        except BaseException:
            if server is not None:
                server.stop()
            else:
                if guard is not None:  # its pipe closes without "stop": it cleans up, we wait for it
                    guard.stdin.close()
                    guard.wait(60)
                shutil.rmtree(root, ignore_errors=True)
            raise

    def stop(self) -> None:
        """Stop our own server (fast, then immediate) and delete its folder; a server of the env var stays."""
        self._admin.dispose()
        if self.root is None:
            return
        try:
            data = os.path.join(self.root, "data")
            if os.path.exists(os.path.join(data, "postmaster.pid")):
                pg_ctl = os.path.join(self.bin_dir, "pg_ctl")
                try:
                    _run(self.run_as, [pg_ctl, "-D", data, "-m", "fast", "-w", "-t", "30", "stop"], what="pg_ctl stop")
                except PostgresUnavailable:
                    _run(self.run_as, [pg_ctl, "-D", data, "-m", "immediate", "-w", "-t", "30", "stop"],
                         what="pg_ctl stop -m immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
            if self._guard is not None:
                try:
                    self._guard.stdin.write(b"stop\n")
                    self._guard.stdin.close()
                except OSError:
                    pass
                self._guard.wait(60)
                self._guard = None

    def _check(self) -> None:
        try:
            with self._admin.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except sa.exc.OperationalError as e:
            shown = self.admin_url.render_as_string(hide_password=True)
            raise PostgresUnavailable(f"cannot connect to {shown}: {str(e.orig).strip().splitlines()[0]}") from None

    # ---- databases ----
    def create_database(self) -> str:
        """A new empty database; returns its SQLAlchemy URL (psycopg)."""
        name = f"ft_{uuid.uuid4().hex[:16]}"
        with self._admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        return self.admin_url.set(database=name).render_as_string(hide_password=False)

    def drop_database(self, url: str) -> None:
        name = sa.engine.make_url(url).database
        with self._admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _start_guard(root: str, bin_dir: str, run_as: pwd.struct_passwd | None) -> subprocess.Popen:
    ids = [str(run_as.pw_uid), str(run_as.pw_gid)] if run_as is not None else ["-1", "-1"]
    # its own session: a Ctrl-C of the test run reaches pytest (which tears down), not the guard
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--guard", root, bin_dir, *ids],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def _guard_main(root: str, bin_dir: str, uid: int, gid: int) -> None:
    """Wait for the test process's pipe to close; unless it said ``stop``, stop the server and delete ``root``."""
    said = sys.stdin.buffer.read()
    if said.strip() == b"stop":
        return
    data = os.path.join(root, "data")
    if os.path.exists(os.path.join(data, "postmaster.pid")):
        run_as = pwd.getpwuid(uid) if uid >= 0 else None
        try:
            _run(run_as, [os.path.join(bin_dir, "pg_ctl"), "-D", data, "-m", "immediate", "-w", "-t", "30", "stop"],
                 what="pg_ctl stop")
        except (PostgresUnavailable, subprocess.TimeoutExpired):
            pass
    shutil.rmtree(root, ignore_errors=True)


def _run(run_as: pwd.struct_passwd | None, cmd: list[str], *, what: str, log: str | None = None) -> None:
    kwargs = {}
    if run_as is not None:  # as root: the server's own user, its groups only
        kwargs = {"user": run_as.pw_uid, "group": run_as.pw_gid, "extra_groups": [], "cwd": "/"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "LC_ALL": "C"}, **kwargs)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        if log and os.path.exists(log):
            with open(log) as f:
                detail += f.read().strip().splitlines()[-3:]
        raise PostgresUnavailable(f"{what} failed (exit {done.returncode}): {' | '.join(detail[-4:])}")


if __name__ == "__main__" and sys.argv[1:2] == ["--guard"]:
    _guard_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
