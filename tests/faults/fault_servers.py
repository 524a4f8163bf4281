"""The servers the fault tests break: a NATS server or 3-node JetStream cluster, a private PostgreSQL.

Real processes on loopback ports of their own (never the machine's shared NATS or PostgreSQL); each
can be killed, stopped and started again by a test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from faults_support import HOST, eventually

from hie_platform.natsd import MAX_PAYLOAD, find_nats_server, free_port, wait_for_port

# --- NATS: one server, or a 3-node JetStream cluster ----------------------------------------------


@dataclass
class NatsNode:
    name: str
    port: int
    cluster_port: int
    store: Path
    config: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class NatsCluster:
    """``size`` nats-server processes clustered with JetStream (one server when ``size`` is 1)."""

    def __init__(self, root: Path, size: int = 3) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.nodes = [
            NatsNode(
                name=f"n{i}",
                port=free_port(HOST),
                cluster_port=free_port(HOST),
                store=root / f"n{i}" / "js",
                config=root / f"n{i}.conf",
                log=root / f"n{i}.log",
            )
            for i in range(1, size + 1)
        ]

    @property
    def url(self) -> str:
        """Every server, comma-separated (what the services are given as NATS_URL)."""
        return ",".join(node.url for node in self.nodes)

    def _config(self, node: NatsNode) -> str:
        lines = [
            f"server_name: {node.name}",
            f"listen: {HOST}:{node.port}",
            f"max_payload: {MAX_PAYLOAD}",
            f'jetstream {{ store_dir: "{node.store}" }}',
        ]
        if len(self.nodes) > 1:
            routes = ", ".join(f"nats-route://{HOST}:{n.cluster_port}" for n in self.nodes)
            lines.append(
                f"cluster {{ name: hie-faults, listen: {HOST}:{node.cluster_port}, routes: [{routes}] }}"
            )
        return "\n".join(lines) + "\n"

    def start_node(self, node: NatsNode) -> None:
        node.store.mkdir(parents=True, exist_ok=True)
        node.config.write_text(self._config(node))
        with open(node.log, "ab") as out:
            node.process = subprocess.Popen(
                [find_nats_server(), "-c", str(node.config)], stdout=out, stderr=subprocess.STDOUT
            )
        wait_for_port(HOST, node.port, 30.0, node.process)

    async def start(self) -> NatsCluster:
        for node in self.nodes:
            self.start_node(node)
        await self.wait_jetstream()
        return self

    async def wait_jetstream(self, timeout: float = 60.0) -> None:
        """Until JetStream can place a stream on every server (a meta leader with all peers known)."""
        from nats.js.api import StreamConfig

        nc = await nats.connect(self.url.split(","), connect_timeout=5)
        try:
            js = nc.jetstream()

            async def ready() -> bool:
                try:
                    probe = StreamConfig(
                        name="FAULTS_PROBE", subjects=["faults.probe"], num_replicas=len(self.nodes)
                    )
                    await js.add_stream(probe)
                    await js.delete_stream("FAULTS_PROBE")
                except Exception:
                    return False
                return True

            await eventually(ready, "JetStream on every NATS server", timeout)
        finally:
            await nc.close()

    def node(self, name: str) -> NatsNode:
        return next(n for n in self.nodes if n.name == name)

    def kill(self, name: str) -> None:
        node = self.node(name)
        assert node.process is not None
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(30)

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
                try:
                    node.process.wait(15)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait(10)


async def stream_info(nats_url: str, stream: str, subjects_filter: str | None = None) -> Any:
    nc = await nats.connect(nats_url.split(","), connect_timeout=5)
    try:
        return await nc.jetstream().stream_info(stream, subjects_filter=subjects_filter)
    finally:
        await nc.close()


# --- a private PostgreSQL cluster (never the machine's shared one) --------------------------------


def postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL binaries with initdb and pg_ctl, if any."""
    found = sorted(
        (
            p
            for p in Path("/usr/lib/postgresql").glob("*/bin")
            if (p / "initdb").exists() and (p / "pg_ctl").exists()
        ),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return found[-1] if found else None


class PrivatePostgres:
    """initdb + pg_ctl as the postgres user, in a directory of its own, on a free loopback port."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="hie-faults-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = free_port(HOST)

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@{HOST}:{self.port}/postgres"

    def _as_postgres(self, *args: str, timeout: float = 120.0) -> None:
        command = ["runuser", "-u", "postgres", "--", *args]
        done = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {done.stdout.decode()} {done.stderr.decode()}")

    def init(self) -> PrivatePostgres:
        os.chmod(self.root, 0o755)
        shutil.chown(self.root, "postgres", "postgres")
        self._as_postgres(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync"
        )
        return self

    def start(self) -> None:
        # fsync off: the fault is a restart of the server process, not a crash of the machine (the
        # operating system keeps what was written), and the tests run on two shared cores.
        options = f"-p {self.port} -c listen_addresses={HOST} -k {self.root} -c fsync=off"
        self._as_postgres(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
