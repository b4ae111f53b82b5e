"""A throwaway PostgreSQL server for the state contract test and bench/load.py, started from the machine's own binaries.

Listens only on a Unix socket in a temporary folder. As root (CI), the server runs as the `postgres`
user, since PostgreSQL refuses to run as root.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path


def unavailable() -> str | None:
    """Why no server can be started here, or None."""
    missing = [b for b in ("initdb", "pg_ctl") if not shutil.which(b)]
    if missing:
        return f"PostgreSQL binaries not on PATH: {', '.join(missing)}"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run the server as"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed"
    return None


class Server:
    def __init__(self, port: int = 55433):
        self.root = Path(tempfile.mkdtemp(prefix="offsite-pg-"))
        self.port = port
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.root, "postgres")
        self._pg("initdb", "-D", str(self.root / "data"), "-A", "trust", "-U", "offsite")
        self._pg("pg_ctl", "-D", str(self.root / "data"), "-w", "-l", str(self.root / "log"),
                 "-o", f"-k {self.root} -p {port} -c listen_addresses=''", "start")
        self._count = 0

    def _pg(self, *argv: str) -> None:
        subprocess.run([*self._as, *argv], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def url(self, dbname: str) -> str:
        return f"postgresql://offsite@/{dbname}?host={self.root}&port={self.port}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg
        self._count += 1
        name = f"state_{self._count}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        self._pg("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
