"""A throwaway PostgreSQL server for the tests, from the machine's own binaries (Debian's postgresql).

initdb refuses to run as root, so as root the server runs as the `postgres` user (runuser); its data
directory is a temporary one, its socket too, and it listens on 127.0.0.1 only, with trust auth.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path


def _binaries() -> Path:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not candidates:
        raise RuntimeError("PostgreSQL's initdb was not found: install Debian's postgresql package "
                           "(make test does, where it is missing)")
    return Path(candidates[-1]).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """initdb'd at construction in a directory of its own (directly under the temporary directory,
    so that the postgres user can reach it); `remove()` deletes it."""

    def __init__(self):
        self.bin = _binaries()
        self.directory = Path(tempfile.mkdtemp(prefix="recsys-postgres-"))
        self.data = self.directory / "data"
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.directory, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    def _run(self, program: str, *arguments: str) -> None:
        command = [str(self.bin / program), *arguments]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, cwd=self.directory)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.directory / "log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def clear(self) -> None:
        """Drop everything the store created, so each test starts empty."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute("DROP TABLE IF EXISTS interactions, forgotten, schema_migrations")

    def processes(self) -> list[int]:
        """The postmaster's pid and its children's (the backends serving connections)."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
        return [postmaster, *map(int, children)]

    def freeze(self) -> list[int]:
        """SIGSTOP the server and its backends: connections stay open and nothing answers (a hung host)."""
        frozen = self.processes()
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        return frozen

    @staticmethod
    def thaw(frozen: list[int]) -> None:
        """SIGCONT each; one gone meanwhile was a child that had exited (a zombie takes SIGSTOP), which
        the postmaster, continued first, has reaped."""
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
