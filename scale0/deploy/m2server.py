"""Running a Mongrel2 server: runtime folder, config.sqlite, command line.

docs/mongrel2.md "Running it": Mongrel2 runs from its config's directory with
relative chroot "./"; as root it chroots there (uploads, logs and the pid
file are then relative to it), as another user it runs in test mode with
the same relative paths. The runtime folder is generated, never committed.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from scale0.deploy.malloc import child_overrides
from scale0.errors import Scale0Error
from scale0.pool.lifeline import watcher_argv

RUNTIME_DIRS = ("run", "logs", "uploads", "tmp")


class Mongrel2Error(Scale0Error, RuntimeError):
    """Mongrel2 is missing or its config does not load; the text says what to do."""


@dataclass(frozen=True, slots=True)
class Mongrel2Server:
    config: Path  # the m2sh config (mongrel2.conf)
    runtime_dir: Path  # where config.sqlite, run/, logs/, uploads/ are generated
    uuid: str

    @property
    def upload_dir(self) -> Path:
        return self.runtime_dir / "uploads"

    @property
    def pid_file(self) -> Path:
        return self.runtime_dir / "run" / "mongrel2.pid"

    def prepare(self) -> None:
        """Create the runtime folder, load config.sqlite, remove a stale pid file."""
        for tool in ("mongrel2", "m2sh"):
            if shutil.which(tool) is None:
                raise Mongrel2Error(
                    f"'{tool}' not found: install Debian's mongrel2-core "
                    "(apt-get install mongrel2-core, or `make run` as root)")
        for name in RUNTIME_DIRS:
            (self.runtime_dir / name).mkdir(parents=True, exist_ok=True)
        db = self.runtime_dir / "config.sqlite"
        db.unlink(missing_ok=True)
        env = {**os.environ, "LOGNAME": os.environ.get("LOGNAME") or "scale0"}
        result = subprocess.run(
            ["m2sh", "load", "-config", str(self.config.resolve()), "-db", "config.sqlite"],
            cwd=self.runtime_dir, env=env, capture_output=True, text=True, timeout=30)
        if result.returncode != 0 or not db.exists():
            raise Mongrel2Error(f"m2sh could not load {self.config}:\n{result.stderr.strip()}")
        self.remove_pid_file()

    def remove_pid_file(self) -> None:
        for pid_file in (self.pid_file, self.runtime_dir / ".run" / "mongrel2.pid"):
            pid_file.unlink(missing_ok=True)

    def argv(self) -> list[str]:
        """The command line: through env(1) with glibc malloc thresholds that
        keep a large reply's buffers mapped from one reply to the next
        (deploy/malloc.py), unless the operator set them. In the command
        line, so whatever starts Mongrel2 gives them."""
        tunables = [f"{name}={value}" for name, value in child_overrides(os.environ).items()]
        return [*(["env", *tunables] if tunables else []), "mongrel2", "config.sqlite", self.uuid]

    def supervised_argv(self) -> list[str]:
        """`argv()` for a supervisor whose death must stop Mongrel2 (pool/lifeline.py).
        As root Mongrel2 drops to the owner of its directory, which clears a
        parent-death signal, so it runs under the lifeline watcher; as another
        user it keeps its uid and the death signal set before exec holds."""
        return watcher_argv(self.argv()) if os.geteuid() == 0 else self.argv()


def raise_open_files_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns the new soft limit.

    Children inherit it: Mongrel2 needs one descriptor per client connection.
    As root Mongrel2 then sets both limits to its `superpoll.max_fd` setting
    (default 10240) itself; as another user it keeps the soft limit it was
    started with, so the soft limit is what caps its connections.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def server_uuid(config_text: str) -> str:
    """The first Server(uuid=...) in an m2sh config."""
    match = re.search(r"""uuid\s*=\s*["']([0-9A-Za-z-]+)["']""", config_text)
    if match is None:
        raise Mongrel2Error("no Server(uuid=...) in the Mongrel2 config")
    return match.group(1)
