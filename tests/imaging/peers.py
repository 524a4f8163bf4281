"""Real peers of the end-to-end and fault tests: synthetic CT series, Orthanc on loopback ports, and
a gateway as a real `python -m hie_imaging` process that can be SIGKILLed and started again.

A module of its own (not conftest.py) so that test modules can import it by name.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_harness import HUB_GATEWAY_AE, Federation
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from hie_imaging.dicom import DicomEndpoint
from hie_imaging.models import Instance, StudyLink
from hie_platform.db import Database
from hie_platform.natsd import free_port

ORTHANC_AE = "ORTHANC_PACS"


# The calling AE title of the modality in the gateway tests (the gateways allow it by default).
MODALITY_AE = "CT_MODALITY"


def ct_series(out_dir: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` CT instances of one new study: pydicom's CT_small (128×128×16 bit) with fresh UIDs and
    pixels of their own, so that a mixed-up or altered instance cannot pass for another."""
    source = get_testdata_file("CT_small.dcm")
    assert source is not None, "pydicom's CT_small.dcm test file is missing"
    ds = dcmread(source)
    # Data Set Trailing Padding (FFFC,FFFC) carries nothing and PS3.10 §7.2 lets any application drop
    # it (DCMTK's storescu does); without it, "bit-identical" can be checked for the whole dataset.
    del ds[0xFFFCFFFC]
    rng = random.Random(seed)
    out_dir.mkdir(parents=True)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    paths = []
    for number in range(1, count + 1):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number
        ds.PixelData = rng.randbytes(len(ds.PixelData))
        path = out_dir / f"{number:04d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def dataset_bytes(part10: bytes) -> bytes:
    """The dataset of a Part 10 file without preamble and file meta: what travels in a C-STORE.

    Each hop writes its own file meta (implementation UID, source AE), so that part may differ;
    the dataset must not differ by one bit. PS3.10 §7.1: (0002,0000) comes first and gives the
    length of the rest of the meta group.
    """
    assert part10[128:132] == b"DICM", "not a Part 10 file"
    assert part10[132:140] == b"\x02\x00\x00\x00UL\x04\x00", "file meta does not start with (0002,0000)"
    meta_length = int.from_bytes(part10[140:144], "little")
    return part10[144 + meta_length :]


def sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


def wait_until(predicate: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


# --- Orthanc ------------------------------------------------------------------------------------------


def orthanc_binary() -> str:
    path = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
    if path is None:
        pytest.skip("Orthanc not installed (apt-get install orthanc)")
    return path


class Orthanc:
    """An Orthanc PACS on free loopback ports, its own storage and index, no plugins, REST open
    on loopback only. Its DICOM side takes TCP_NODELAY from the environment (it is built on DCMTK)."""

    def __init__(self, binary: str, folder: Path) -> None:
        folder.mkdir(parents=True)
        self.folder = folder
        self.dicom_port, self.http_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        config = {
            "Name": "hie-test-pacs",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "StorageCompression": False,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": ORTHANC_AE,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "Plugins": [],
            "SaveJobs": False,
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.log = folder / "orthanc.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [binary, str(folder / "orthanc.json")],
                env={**os.environ, "TCP_NODELAY": "1"},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.http = httpx.Client(base_url=self.url, timeout=30.0)

        def ready() -> bool:
            assert self.process.poll() is None, f"Orthanc exited; see {self.log}"
            try:
                return _listening(self.dicom_port) and self.http.get("/system").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, "Orthanc to start", 60)

    @property
    def endpoint(self) -> DicomEndpoint:
        return DicomEndpoint(ORTHANC_AE, "127.0.0.1", self.dicom_port)

    def study_files(self, study_uid: str) -> dict[str, bytes]:
        """SOP Instance UID -> the Part 10 file Orthanc stored, for every instance of the study."""
        found = self.http.post("/tools/lookup", content=study_uid)
        found.raise_for_status()
        studies = [item["ID"] for item in found.json() if item["Type"] == "Study"]
        if not studies:
            return {}
        files = {}
        for instance in self.http.get(f"/studies/{studies[0]}/instances").json():
            data = self.http.get(f"/instances/{instance['ID']}/file").content
            files[instance["MainDicomTags"]["SOPInstanceUID"]] = data
        return files

    def instance_count(self) -> int:
        return int(self.http.get("/statistics").json()["CountInstances"])

    def stop(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)


# --- the gateway as a process ---------------------------------------------------------------------


@dataclass
class GatewayProcess:
    """One hub's gateway as `python -m hie_imaging`, on its own SQLite file and spool folder."""

    hub: str
    federation: Federation
    folder: Path
    settings: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    http_port: int = 0

    @property
    def database_url(self) -> str:
        return f"sqlite+aiosqlite:///{self.folder / 'imaging.db'}"

    @property
    def endpoint(self) -> DicomEndpoint:
        return self.federation.gateway(self.hub)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60.0) -> GatewayProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        values = {
            "HUB": self.hub,
            "AE_TITLE": HUB_GATEWAY_AE[self.hub],
            "HOST": "127.0.0.1",
            "PORT": str(self.http_port),
            "DICOM_HOST": "127.0.0.1",
            "DICOM_PORT": str(self.federation.dicom_ports[self.hub]),
            "SPOOL_DIR": str(self.folder / "spool"),
            "DATABASE_URL": self.database_url,
            "NATS_URL": self.federation.nats_url,
            "REGISTRY_URL": self.federation.registry_url,
            "NODE": f"imaging-{self.hub}-process",
            "ENVIRONMENT": "development",
            "LOG_LEVEL": "WARNING",
            **self.settings,
        }
        env = {**os.environ, **{f"HIE_IMAGING_{key}": value for key, value in values.items()}}
        with open(self.folder / "gateway.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "hie_imaging"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        process = self.process

        def ready() -> bool:
            assert process.poll() is None, f"the {self.hub} gateway exited; see {self.folder / 'gateway.log'}"
            try:
                response = httpx.get(f"http://127.0.0.1:{self.http_port}/readyz", timeout=2.0)
            except httpx.HTTPError:
                return False
            return response.status_code == 200 and _listening(self.federation.dicom_ports[self.hub])

        wait_until(ready, f"the {self.hub} gateway process to be ready", timeout)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when the machine loses power or the OOM killer strikes."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self.process = None

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def peak_rss_kib(self) -> int:
        """VmHWM: the most resident memory the process has had since it started."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM in /proc status")

    async def status(self, study_uid: str) -> dict[str, Any] | None:
        headers = {"Authorization": f"Bearer {await self.federation.token()}"}
        async with httpx.AsyncClient(timeout=10.0) as http:
            response = await http.get(
                f"http://127.0.0.1:{self.http_port}/studies/{study_uid}", headers=headers
            )
        if response.status_code == 404:
            return None
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def rows(self, study_uid: str) -> dict[str, int]:
        """Straight from the gateway's SQLite file (also while the process is down)."""
        db = Database(self.database_url)
        try:
            async with db.read_sessions() as session:
                where = Instance.study_instance_uid == study_uid
                query = select(Instance.state, func.count()).where(where).group_by(Instance.state)
                counts = {str(state): int(n) for state, n in (await session.execute(query)).all()}
                links = await session.scalar(
                    select(func.count()).where(StudyLink.study_instance_uid == study_uid)
                )
        finally:
            await db.dispose()
        return {**counts, "links": int(links or 0)}


def dcmtk_tool(name: str) -> str | None:
    """DCMTK's ``name`` on PATH, never the same-named pynetdicom app in this virtualenv's bin (pynetdicom
    installs ``storescu``, ``storescp``, ``echoscu`` … scripts there, with other options)."""
    venv_bin = (Path(sys.prefix) / "bin").resolve()
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and Path(d).resolve() != venv_bin]
    return shutil.which(name, path=os.pathsep.join(dirs))
