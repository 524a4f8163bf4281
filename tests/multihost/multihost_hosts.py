"""Hosts and the processes on them, for the multi-host test: network namespaces on a bridge, each
with an address of its own, and processes started inside them with an environment and a log.

Part of the multi-host test: multihost_support.py places the overlay's pods on these hosts.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from multihost_render import HOSTS, SetupError

CLONE_NEWNET = 0x40000000
# ENV of the image's runtime stage (Dockerfile) other than PATH; its HIE_* values are all
# overridden by the ConfigMaps, so they are left out.
IMAGE_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
T = TypeVar("T")

# --- can this machine do it at all? --------------------------------------------------------------


def netns_problem() -> str | None:
    """Why network namespaces cannot be created here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces are Linux only (this is {sys.platform})"
    if os.geteuid() != 0:
        return (
            "creating network namespaces, veth pairs and a bridge needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
        )
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"hie-probe-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return f"ip netns add failed: {result.stderr.strip() or result.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    link = f"hieprb{uuid.uuid4().hex[:6]}"
    result = subprocess.run(
        ["ip", "link", "add", link, "type", "bridge"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        return f"ip link add (bridge) failed: {result.stderr.strip() or result.returncode}"
    subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
    return None


def postgres_bin() -> Path | None:
    """The Debian PostgreSQL server binaries (newest major), if installed with their system user."""
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None
    found = [
        p
        for p in Path("/usr/lib/postgresql").glob("*/bin")
        if all((p / tool).is_file() for tool in ("initdb", "postgres", "pg_isready"))
    ]
    found.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return found[-1] if found else None


# --- hosts: network namespaces on a bridge ---------------------------------------------------------


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if result.returncode != 0:
        raise SetupError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _free_subnet() -> str:
    """A /24 in 10.0.0.0/8 that no interface or route of this machine uses yet ("10.x.y")."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=False).stdout
    used += subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=False).stdout
    if re.search(r"\b10\.0\.0\.0/8\b", used):
        raise SetupError("10.0.0.0/8 is routed on this machine; no private subnet for the hosts")
    rng = random.SystemRandom()
    for _ in range(200):
        prefix = f"10.{rng.randint(100, 250)}.{rng.randint(0, 255)}"
        if f"{prefix}." not in used:
            return prefix
    raise SetupError("no free 10.x.y.0/24 subnet found for the hosts")


@dataclass
class Network:
    """A bridge in the root namespace (the hospitals' and operators' side) and one namespace per host."""

    run_id: str
    prefix: str = ""
    bridge: str = ""
    namespaces: dict[str, str] = field(default_factory=dict)  # host -> netns name
    ips: dict[str, str] = field(default_factory=dict)
    links: list[str] = field(default_factory=list)

    @property
    def gateway_ip(self) -> str:
        return f"{self.prefix}.1"

    def create(self, hosts: tuple[str, ...] = HOSTS) -> None:
        self.prefix = _free_subnet()
        self.bridge = f"hmb{self.run_id}"
        _ip("link", "add", self.bridge, "type", "bridge")
        self.links.append(self.bridge)
        _ip("addr", "add", f"{self.gateway_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for index, host in enumerate(hosts):
            netns = f"hie-mh-{self.run_id}-{host}"
            _ip("netns", "add", netns)
            self.namespaces[host] = netns
            outside, inside = f"hm{self.run_id}{index}r", f"hm{self.run_id}{index}n"
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            self.links.append(outside)
            _ip("link", "set", inside, "netns", netns)
            _ip("-n", netns, "link", "set", inside, "name", "eth0")
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            ip = f"{self.prefix}.{10 + index}"
            _ip("-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
            _ip("-n", netns, "link", "set", "eth0", "up")
            _ip("-n", netns, "link", "set", "lo", "up")
            self.ips[host] = ip

    def destroy(self) -> list[str]:
        """Delete what create() made (namespaces take their veth ends along); returns what failed."""
        problems = []
        for netns in self.namespaces.values():
            result = subprocess.run(
                ["ip", "netns", "del", netns], capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                problems.append(f"ip netns del {netns}: {result.stderr.strip()}")
        for link in reversed(self.links):
            exists = subprocess.run(["ip", "link", "show", link], capture_output=True, check=False)
            if exists.returncode == 0:
                result = subprocess.run(
                    ["ip", "link", "del", link], capture_output=True, text=True, check=False
                )
                # A veth goes with its peer's namespace, possibly between the show and the del.
                if result.returncode != 0 and "Cannot find device" not in result.stderr:
                    problems.append(f"ip link del {link}: {result.stderr.strip()}")
        return problems


def in_netns(netns: str, action: Callable[[], T]) -> T:
    """Run action on a thread of its own that has joined netns (sockets it opens stay there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns({netns}): {os.strerror(errno)}")
            finally:
                os.close(fd)
            outcome["value"] = action()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    value: T = outcome["value"]
    return value


# --- processes -----------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    host: str
    process: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str]  # what it was given
    rendered_env: dict[str, str] = field(default_factory=dict)  # what the overlay says
    workload: dict[str, Any] = field(default_factory=dict)
    container: dict[str, Any] = field(default_factory=dict)
    url: str | None = None

    def last_lines(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def environ_of(pid: int) -> dict[str, str]:
    """The environment a running process was started with (/proc/<pid>/environ)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode() for k, v in pairs}


@dataclass
class Processes:
    network: Network
    logs: Path
    started: list[Proc] = field(default_factory=list)

    def spawn(
        self,
        name: str,
        host: str,
        argv: list[str],
        env: dict[str, str],
        *,
        user: str | None = None,
        url: str | None = None,
    ) -> Proc:
        """Start argv inside the host's namespace (``ip netns exec`` execs it: same PID)."""
        prefix = ["ip", "netns", "exec", self.network.namespaces[host]]
        if user is not None:  # setpriv execs too, so the PID stays the server's
            prefix += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                [*prefix, *argv], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        proc = Proc(name, host, process, log, env, url=url)
        self.started.append(proc)
        return proc

    def stop_all(self, timeout: float = 20.0) -> None:
        """SIGTERM to each process group we started, newest first, then SIGKILL what is left."""
        for proc in reversed(self.started):
            if proc.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in reversed(self.started):
            try:
                proc.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.process.pid, signal.SIGKILL)
                proc.process.wait(10)


def wait_until(what: str, probe: Callable[[], bool], timeout: float, procs: Sequence[Proc] = ()) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for proc in procs:
            if proc.process.poll() is not None:
                raise SetupError(
                    f"{proc.name} on {proc.host} exited with {proc.process.returncode} while waiting for "
                    f"{what}:\n{proc.last_lines()}"
                )
        if probe():
            return
        if time.monotonic() > deadline:
            details = "\n".join(f"--- {p.name}\n{p.last_lines(8)}" for p in procs)
            raise SetupError(f"timed out after {timeout:.0f}s waiting for {what}\n{details}")
        time.sleep(0.2)


def http_ok(url: str) -> bool:
    try:
        # The hosts are on the bridge: never through a proxy from the environment.
        return httpx.get(url, timeout=3.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def base_env() -> dict[str, str]:
    """What a process gets besides its container's environment: the image's PATH and ENV."""
    return {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}", **IMAGE_ENV}


def command(container: dict[str, Any]) -> list[str]:
    """The container's command with ``python`` as this virtual environment's interpreter."""
    argv = [*container.get("command", []), *container.get("args", [])]
    if not argv or argv[0] != "python":
        raise SetupError(f"container {container['name']} does not run python: {argv}")
    return [sys.executable, *argv[1:]]
