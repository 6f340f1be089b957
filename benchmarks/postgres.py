"""A PostgreSQL server of our own for tests and benchmarks: Debian's package (scripts/install_postgresql.sh),
started with initdb and pg_ctl in a temporary folder, as a non-root user, on a free loopback port, and
stopped and deleted afterwards. Never the system service.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.servers import free_port

PG_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))


@dataclass
class Postgres:
    """A running server: its URL, and stop/start for fault tests."""

    folder: Path
    port: int
    user: str | None  # the system user it runs as (root can't run it), None when we are not root

    @property
    def url(self) -> str:
        return f"postgresql://postgres:secret-pw@127.0.0.1:{self.port}/postgres"

    @property
    def pid(self) -> int:
        """The postmaster's pid (its backends are its children)."""
        return int((self.folder / "data" / "postmaster.pid").read_text().split()[0])

    def pg_ctl(self, *args: str) -> None:
        command = [str(PG_BIN[-1]), "-D", str(self.folder / "data"), "-w", "-t", "60", *args]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=90)

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.folder}"
        self.pg_ctl("-l", str(self.folder / "postgres.log"), "-o", options, "start")

    def stop(self) -> None:
        self.pg_ctl("-m", "fast", "stop")


def _pg_user() -> str | None:
    """A non-root user to run PostgreSQL as (Debian's package creates `postgres`)."""
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(KeyError):
        return pwd.getpwnam("postgres").pw_name
    subprocess.run(["useradd", "--system", "--no-create-home", "mnist-pg"], check=True)
    return "mnist-pg"


@contextlib.contextmanager
def temporary_postgres() -> Iterator[Postgres]:
    """A fresh server, running until the block ends; RuntimeError when PostgreSQL is not installed."""
    if not PG_BIN:
        raise RuntimeError("PostgreSQL is not installed: run scripts/install_postgresql.sh (make test does)")
    user = _pg_user()
    # Under /tmp itself: pytest's temporary folders are private to root, and PostgreSQL runs as `user`.
    folder = Path(tempfile.mkdtemp(prefix="mnist-pg-"))
    password = folder / "password"
    password.write_text("secret-pw\n")
    if user is not None:
        shutil.chown(folder, user)
        shutil.chown(password, user)
    initdb = [str(PG_BIN[-1].parent / "initdb"), "-D", str(folder / "data"), "-U", "postgres",
              "--auth=scram-sha-256", f"--pwfile={password}", "--no-sync"]
    if user is not None:
        initdb = ["runuser", "-u", user, "--", *initdb]
    try:
        subprocess.run(initdb, check=True, capture_output=True, timeout=120)
        server = Postgres(folder, free_port(), user)
        server.start()
        try:
            yield server
        finally:
            with contextlib.suppress(subprocess.CalledProcessError):
                server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
