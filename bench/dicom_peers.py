"""The DICOM side of the imaging benchmark: CT series made with pydicom, and the peers we did not
write (DCMTK's storescu, storescp and echoscu; Orthanc routing with Lua) that bench.imaging_bench
times our gateways against."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from hie_platform.natsd import free_port

SINK_AE, ORTHANC_AE, SCU_AE = "SINK", "ORTHANC", "BENCH_SCU"
NODELAY = {**os.environ, "TCP_NODELAY": "1"}
TIMEOUT = 300.0


@dataclass
class Series:
    study_uid: str
    files: list[Path]

    @property
    def bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)


def make_series(out_dir: Path, count: int, seed: int, side: int = 128) -> Series:
    """`count` CT instances of side×side×16 bit, explicit VR little endian (pydicom's CT_small with
    fresh pixels, size and UIDs)."""
    source = get_testdata_file("CT_small.dcm")
    assert source is not None, "pydicom's CT_small.dcm test file is missing"
    template = dcmread(source)
    del template[0xFFFCFFFC]  # Data Set Trailing Padding: DCMTK drops it (PS3.10 §7.2 allows that)
    rng = random.Random(seed)
    out_dir.mkdir(parents=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    files = []
    for number in range(1, count + 1):
        template.StudyInstanceUID = study_uid
        template.SeriesInstanceUID = series_uid
        template.SOPInstanceUID = generate_uid()
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        template.InstanceNumber = number
        template.AccessionNumber = f"BENCH{seed:04d}"
        template.Rows = template.Columns = side
        template.PixelData = rng.randbytes(side * side * 2)
        path = out_dir / f"{number:04d}.dcm"
        template.save_as(path)
        files.append(path)
    return Series(study_uid, files)


def wait_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {port}")
        time.sleep(0.05)


class Sink:
    """DCMTK storescp writing every received instance to its own folder (one file per C-STORE)."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "sink"
        self.dir.mkdir()
        self.port = free_port()
        self.process = subprocess.Popen(
            [dcmtk("storescp"), "-aet", SINK_AE, "-od", str(self.dir), "+uf", str(self.port)],
            env=NODELAY,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, self.process, "storescp")

    def count(self) -> int:
        return sum(1 for _ in os.scandir(self.dir))

    def clear(self) -> None:
        for entry in os.scandir(self.dir):
            os.unlink(entry.path)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def dcmtk(name: str) -> str:
    """DCMTK's ``name``, never pynetdicom's same-named app in this virtualenv's bin (other options)."""
    venv_bin = (Path(sys.prefix) / "bin").resolve()
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and Path(d).resolve() != venv_bin]
    path = shutil.which(name, path=os.pathsep.join(dirs))
    if path is None:
        raise RuntimeError(f"DCMTK's {name} is not installed (apt-get install dcmtk)")
    return path


def storescu(host: str, port: int, called_ae: str, calling_ae: str, files: list[Path]) -> None:
    args = [dcmtk("storescu"), "-aet", calling_ae, "-aec", called_ae, host, str(port), *map(str, files)]
    result = subprocess.run(args, env=NODELAY, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.stderr[-500:]}")


async def until_sink_has(sink: Sink, count: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while sink.count() < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the sink has {sink.count()} of {count} instances after {TIMEOUT} s")
        await asyncio.sleep(0.01)


def sink_free(sink: Sink) -> None:
    """Block until the sink takes a new association (C-ECHO), untimed, before the next leg starts.

    storescp serves one association at a time, and Orthanc keeps the association its Lua script
    opened to the sink for DicomAssociationCloseDelay (5 s by default) after the last instance: the
    leg after Orthanc's would otherwise wait up to 5 s at the sink's door inside its own timing.
    """
    args = [dcmtk("echoscu"), "-aet", SCU_AE, "-aec", SINK_AE, "127.0.0.1", str(sink.port)]
    subprocess.run(args, env=NODELAY, capture_output=True, timeout=60, check=True)


async def relay(sink: Sink, series: Series, host: str, port: int, called_ae: str, calling_ae: str) -> float:
    """Seconds from the first C-STORE until the sink has the whole series."""
    await asyncio.to_thread(sink_free, sink)
    sink.clear()
    started = time.perf_counter()
    await asyncio.to_thread(storescu, host, port, called_ae, calling_ae, series.files)
    sent = time.perf_counter() - started
    await until_sink_has(sink, len(series.files))
    elapsed = time.perf_counter() - started
    if os.environ.get("HIE_BENCH_IMAGING_VERBOSE"):
        print(f"imaging:   {called_ae}: storescu done after {sent:.2f} s, complete after {elapsed:.2f} s")
    await asyncio.sleep(0.2)
    if sink.count() != len(series.files):  # a duplicate shows up as one file more (+uf)
        print(f"imaging: WARNING the sink has {sink.count()} files for {len(series.files)} instances")
    return elapsed


# --- (b) Orthanc with Lua auto-routing --------------------------------------------------------------

LUA_ROUTE = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  SendToModality(instanceId, 'sink')
  Delete(instanceId)
end
"""


class Orthanc:
    def __init__(self, root: Path, sink: Sink) -> None:
        folder = root / "orthanc"
        folder.mkdir()
        (folder / "route.lua").write_text(LUA_ROUTE)
        self.dicom_port, self.http_port = free_port(), free_port()
        config = {
            "Name": "bench-router",
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
            "DicomModalities": {"sink": [SINK_AE, "127.0.0.1", sink.port]},
            "LuaScripts": [str(folder / "route.lua")],
            "Plugins": [],
            "SaveJobs": False,
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.process = subprocess.Popen(
            ["Orthanc", str(folder / "orthanc.json")],
            env=NODELAY,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.dicom_port, self.process, "Orthanc")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
