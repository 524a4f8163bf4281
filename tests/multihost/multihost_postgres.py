"""The multi-host test's PostgreSQL: the postgres StatefulSet's database, as a private cluster on the
central host (split from multihost_support.py)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from multihost_render import (
    SetupError,
)

# --- PostgreSQL: the postgres StatefulSet's database, as a private cluster on the central host ---------


@dataclass
class PrivatePostgres:
    """initdb + postgres as the postgres system user, with the StatefulSet's POSTGRES_* settings."""

    bin: Path
    env: dict[str, str]  # POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB from the rendered StatefulSet
    data_root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="hie-mh-pg-")))

    @property
    def data(self) -> Path:
        return self.data_root / "data"

    def init(self) -> None:
        pw = pwd.getpwnam("postgres")
        os.chown(self.data_root, pw.pw_uid, pw.pw_gid)
        self.data_root.chmod(0o700)
        pwfile = self.data_root / "pwfile"
        pwfile.write_text(self.env["POSTGRES_PASSWORD"] + "\n")
        os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        pwfile.chmod(0o600)
        result = subprocess.run(
            [
                "setpriv",
                f"--reuid={pw.pw_uid}",
                f"--regid={pw.pw_gid}",
                "--init-groups",
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                self.env["POSTGRES_USER"],
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "--encoding=UTF8",
                "--locale=C",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=180,
            env={"PATH": "/usr/bin:/bin", "HOME": str(self.data_root)},
        )
        pwfile.unlink()
        if result.returncode != 0:
            raise SetupError(f"initdb failed: {result.stderr.strip() or result.stdout.strip()}")
        # As the postgres image does: password authentication from every address.
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.write("host all all all scram-sha-256\n")

    def argv(self, listen: str) -> list[str]:
        return [
            str(self.bin / "postgres"),
            "-D",
            str(self.data),
            "-c",
            f"listen_addresses={listen}",
            "-c",
            "port=5432",
            "-c",
            f"unix_socket_directories={self.data_root}",
            # A throwaway cluster: no fsync (durability is not what this test is about).
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
        ]

    def remove(self) -> None:
        shutil.rmtree(self.data_root, ignore_errors=True)
