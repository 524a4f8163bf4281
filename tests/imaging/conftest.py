"""Fixtures for the imaging gateway tests: DICOM files, a running StorageServer, a DCMTK peer, and the
gateway service in a two-hub federation of its own."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from gateway_harness import HUB_GATEWAY_AE, SEVERANCE, SNUBH, ConsentDesk, Federation, GatewayApp, topology
from nats.aio.client import Client as NatsClient
from peers import MODALITY_AE, GatewayProcess, Orthanc, dcmtk_tool, orthanc_binary
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from hie_imaging.config import ImagingSettings
from hie_imaging.dicom.scp import ReceivedInstance, StorageServer
from hie_imaging.dicom.scu import DicomEndpoint

GATEWAY_AE = "HIE_GATEWAY"

MakeSeries = Callable[..., list[Path]]


Poll = Callable[..., None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll until `predicate()` holds; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    return _free_port()


@pytest.fixture
def wait_for() -> Poll:
    """`wait_for(predicate, timeout=10, what=...)`: poll with a deadline instead of sleeping."""
    return _wait_for


@pytest.fixture
def make_series(tmp_path: Path) -> MakeSeries:
    """Copies of a pydicom test file as one new study/series of `count` instances, as Part 10 files."""
    counter = iter(range(1_000_000))

    def make(count: int = 3, source: str = "CT_small.dcm") -> list[Path]:
        template = get_testdata_file(source)
        assert template is not None, f"pydicom test file {source} is missing"
        study_uid, series_uid = generate_uid(), generate_uid()
        out_dir = tmp_path / f"series-{next(counter)}"
        out_dir.mkdir()
        paths = []
        for number in range(1, count + 1):
            ds = dcmread(template)
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = number
            path = out_dir / f"{number:04d}.dcm"
            ds.save_as(path)
            paths.append(path)
        return paths

    return make


@pytest.fixture
def ct_series(make_series: MakeSeries) -> list[Path]:
    return make_series(3)


@dataclass
class Recorder:
    """An `on_instance` that keeps what it was given and answers with a chosen status."""

    status: int = 0x0000
    error: Exception | None = None
    instances: list[ReceivedInstance] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, instance: ReceivedInstance) -> int:
        if self.error is not None:
            raise self.error
        with self._lock:
            self.instances.append(instance)
        return self.status

    def by_uid(self) -> dict[str, ReceivedInstance]:
        with self._lock:
            return {instance.sop_instance_uid: instance for instance in self.instances}


@dataclass
class RunningServer:
    server: StorageServer
    recorder: Recorder
    allowed: set[str]
    endpoint: DicomEndpoint


StartGateway = Callable[..., RunningServer]


@pytest.fixture
def start_gateway() -> Iterator[StartGateway]:
    """Start StorageServers on free loopback ports; by default they allow MODALITY_AE and record."""
    servers: list[StorageServer] = []

    def start(
        is_allowed: Callable[[str, str], bool] | None = None,
        on_instance: Callable[[ReceivedInstance], int] | None = None,
    ) -> RunningServer:
        recorder = Recorder()
        allowed = {MODALITY_AE}
        server = StorageServer(
            GATEWAY_AE,
            is_allowed or (lambda ae, _address: ae in allowed),
            on_instance or recorder,
        )
        server.start("127.0.0.1", 0)
        servers.append(server)
        host, port = server.address
        return RunningServer(server, recorder, allowed, DicomEndpoint(GATEWAY_AE, host, port))

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def gateway(start_gateway: StartGateway) -> RunningServer:
    return start_gateway()


@dataclass(frozen=True)
class Dcmtk:
    storescu: str
    echoscu: str
    storescp: str

    def scu(
        self, tool: str, calling_ae: str, peer: DicomEndpoint, *options: str, files: Sequence[Path] = ()
    ) -> subprocess.CompletedProcess[str]:
        """Run `storescu`/`echoscu` as `calling_ae` against `peer` (TCP_NODELAY=1 makes DCMTK set it)."""
        args = [getattr(self, tool), *options, "-aet", calling_ae, "-aec", peer.ae_title]
        args += [peer.host, str(peer.port), *map(str, files)]
        env = {**os.environ, "TCP_NODELAY": "1"}
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="session")
def dcmtk() -> Dcmtk:
    tools = {name: dcmtk_tool(name) for name in ("storescu", "echoscu", "storescp")}
    missing = sorted(name for name, path in tools.items() if path is None)
    if missing:
        pytest.skip(f"DCMTK not installed (missing {', '.join(missing)}); apt-get install dcmtk")
    return Dcmtk(**{name: str(path) for name, path in tools.items()})


@dataclass(frozen=True)
class DcmtkPeer:
    endpoint: DicomEndpoint
    out_dir: Path
    process: subprocess.Popen[bytes] | None = field(default=None, compare=False, repr=False)

    def stop(self) -> None:
        """Stop the storescp (a PACS going down); start another on the same port and folder to revive it."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def files(self) -> list[Path]:
        """Every file storescp wrote (with +uf, one per C-STORE it accepted, duplicates included)."""
        return sorted(path for path in self.out_dir.iterdir() if path.is_file())

    def received(self) -> dict[str, bytes]:
        """SOP Instance UID -> file bytes, for everything storescp wrote."""
        files = {}
        for path in self.out_dir.iterdir():
            data = path.read_bytes()
            files[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = data
        return files


StartStorescp = Callable[..., DcmtkPeer]


@pytest.fixture
def start_storescp(dcmtk: Dcmtk, tmp_path: Path) -> Iterator[StartStorescp]:
    """Start DCMTK storescp in bit-preserving mode (+B: writes the dataset exactly as received).

    Pass `port` and `out_dir` of a stopped peer to bring the same PACS back up.
    """
    processes: list[subprocess.Popen[bytes]] = []

    def start(*options: str, port: int | None = None, out_dir: Path | None = None) -> DcmtkPeer:
        if out_dir is None:
            out_dir = tmp_path / f"storescp-{len(processes)}"
            out_dir.mkdir()
        port = port or _free_port()
        process = subprocess.Popen(
            [dcmtk.storescp, "-aet", "PEER_PACS", "-od", str(out_dir), "+B", *options, str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # As for the SCU tools: without TCP_NODELAY every C-STORE-RSP waits ~40 ms on a delayed ACK.
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        processes.append(process)

        def listening() -> bool:
            assert process.poll() is None, "storescp exited at startup"
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        _wait_for(listening, what="storescp to listen")
        return DcmtkPeer(DicomEndpoint("PEER_PACS", "127.0.0.1", port), out_dir, process)

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


# --- the gateway service: a two-hub federation of its own -----------------------------------------
# Its own nats-server and registry: the registry must point the hubs at these gateways' DICOM ports
# (topology file), and the consent decision subject and the hubs' durable consumer names are fixed
# for the whole federation, so nothing from other test directories may answer or consume them.

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


@pytest.fixture(scope="session")
async def imaging_federation(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Federation]:
    from hie_platform.natsd import NatsServer, free_port
    from hie_registry.app import create_app
    from hie_registry.config import RegistrySettings

    data = tmp_path_factory.mktemp("imaging-federation")
    nats = NatsServer(data / "js").start()
    ports = {SEVERANCE: free_port(), SNUBH: free_port()}
    (data / "topology.json").write_text(topology(ports))
    port = free_port()
    settings = RegistrySettings(
        database_url=f"sqlite+aiosqlite:///{data / 'registry.db'}",
        nats_url=nats.url,
        port=port,
        registry_url=f"http://127.0.0.1:{port}",
        seed_demo=True,
        credentials_file=data / "credentials.json",
        topology_file=data / "topology.json",
        node="imaging-test-registry",
    )
    running_app = pytestconfig.pluginmanager.get_plugin(str(ROOT_CONFTEST)).RunningApp
    registry = await running_app(create_app(settings), port).start()
    credentials = json.loads((data / "credentials.json").read_text())
    try:
        yield Federation(nats.url, registry.url, credentials, ports)
    finally:
        await registry.stop()
        nats.stop()


@pytest.fixture
async def nats_client(imaging_federation: Federation) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(imaging_federation.nats_url)
    yield nc
    await nc.drain()


@pytest.fixture
async def consent_desk(nats_client: NatsClient) -> AsyncIterator[ConsentDesk]:
    desk = await ConsentDesk(nats_client).start()
    yield desk
    await desk.stop()


StartGatewayApp = Callable[..., Awaitable[GatewayApp]]


@pytest.fixture
async def gateway_apps(
    pytestconfig: pytest.Config,
    imaging_federation: Federation,
    database: tuple[str, str | None],
    tmp_path: Path,
    unique: str,
) -> AsyncIterator[StartGatewayApp]:
    """`await start(hub, **settings)`: that hub's gateway app on the `database` backend, started.

    Each hub gets a database of its own: a SQLite file, or a PostgreSQL schema per hub.
    """
    url, schema = database
    running_app = pytestconfig.pluginmanager.get_plugin(str(ROOT_CONFTEST)).RunningApp
    apps: list[GatewayApp] = []
    extra_schemas: list[str] = []

    async def start(hub: str, **overrides: Any) -> GatewayApp:
        if schema is None:
            db_url, db_schema = f"sqlite+aiosqlite:///{tmp_path / f'imaging-{hub}.db'}", None
        else:
            db_url, db_schema = url, f"{schema}_{hub[:3]}"
            extra_schemas.append(db_schema)
        values: dict[str, Any] = {
            "hub": hub,
            "ae_title": HUB_GATEWAY_AE[hub],
            "dicom_host": "127.0.0.1",
            "dicom_port": imaging_federation.dicom_ports[hub],
            "spool_dir": tmp_path / f"spool-{hub}",
            "database_url": db_url,
            "database_schema": db_schema,
            "nats_url": imaging_federation.nats_url,
            "registry_url": imaging_federation.registry_url,
            "node": f"imaging-{hub}-{unique}",
            "log_json": False,
            # Quick retries so that a peer coming back is noticed within a second or two.
            "relay_backoff_seconds": 0.2,
            "relay_backoff_max_seconds": 1.0,
            "relay_max_attempts": 100,
        }
        app = GatewayApp(ImagingSettings(**(values | overrides)), running_app, imaging_federation)
        apps.append(app)
        return await app.start()

    yield start
    for app in reversed(apps):
        await app.stop()
    if schema is not None:
        import asyncpg

        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            for name in set(extra_schemas):
                await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await conn.close()


# --- real processes: gateways that can be SIGKILLed, and Orthanc ---------------------------------------


@pytest.fixture
def gateway_processes(
    imaging_federation: Federation, tmp_path: Path
) -> Iterator[Callable[..., GatewayProcess]]:
    """`start(hub, **settings)`: that hub's gateway as a `python -m hie_imaging` process, ready.

    The returned GatewayProcess can be kill()ed and start()ed again on the same database and spool.
    """
    started: list[GatewayProcess] = []

    def start(hub: str, **settings: str) -> GatewayProcess:
        # Quick retries, as for the in-process apps, so that a peer coming back is noticed soon.
        values = {
            "RELAY_BACKOFF_SECONDS": "0.2",
            "RELAY_BACKOFF_MAX_SECONDS": "1.0",
            "RELAY_MAX_ATTEMPTS": "100",
        }
        process = GatewayProcess(hub, imaging_federation, tmp_path / f"gateway-{hub}", values | settings)
        started.append(process)
        return process.start()

    yield start
    for process in started:  # SIGTERM to all first: they shut down side by side
        process.terminate()
    for process in reversed(started):
        process.stop()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """Orthanc as a PACS on free loopback ports (skips when Orthanc is not installed)."""
    pacs = Orthanc(orthanc_binary(), tmp_path / "orthanc")
    yield pacs
    pacs.stop()
