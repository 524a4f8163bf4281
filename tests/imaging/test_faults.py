"""Issue 6, bad conditions: a destination PACS down for minutes, and a spool disk that fills up.

The gateway apps run in-process on real uvicorn, SQLite, nats-server and registry (as in
test_gateway.py); the peers are DCMTK tools; the full disk is a real tmpfs that runs out of space.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from gateway_harness import (
    HOSPITAL,
    SEVERANCE,
    SNUBH,
    ConsentDesk,
    Federation,
    new_patient_key,
    publish_exchange,
    referral,
    study_of,
    until_count,
)
from nats.aio.client import Client as NatsClient
from peers import ct_series, dataset_bytes, sop_uid

from hie_imaging.config import ImagingSettings
from hie_imaging.dicom import send_files
from hie_imaging.dicom.spool import INCOMING

if TYPE_CHECKING:
    from conftest import Dcmtk, StartGatewayApp, StartStorescp

pytestmark = [
    pytest.mark.dcmtk,
    pytest.mark.parametrize("database", ["sqlite"], indirect=True),
]

OUTAGE_SECONDS = 120.0  # "down for minutes" (issue 6); covers its "down for a minute" too
TMPFS_BYTES = 2 * 1024 * 1024  # the spool disk: room for a few dozen 33 KiB CT instances
OUT_OF_RESOURCES = 0xA700


# --- the destination PACS is down for two minutes ------------------------------------------------------


class _Kept(logging.Handler):
    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)


@pytest.fixture
def gateway_log() -> Iterator[list[logging.LogRecord]]:
    """What the in-process gateways and pynetdicom log (a service's start replaces the root's handlers,
    pytest's caplog among them, so the records are taken where they are made)."""
    records: list[logging.LogRecord] = []
    handler = _Kept(records)
    loggers = [logging.getLogger(name) for name in ("hie_imaging", "pynetdicom")]
    for logger in loggers:
        logger.addHandler(handler)
    yield records
    for logger in loggers:
        logger.removeHandler(handler)


async def test_destination_pacs_down_for_two_minutes_then_back_gets_everything_once(
    dcmtk: Dcmtk,
    imaging_federation: Federation,
    gateway_apps: StartGatewayApp,
    start_storescp: StartStorescp,
    consent_desk: ConsentDesk,
    nats_client: NatsClient,
    tmp_path: Path,
    gateway_log: list[logging.LogRecord],
) -> None:
    pacs = start_storescp("+uf")
    await imaging_federation.set_dicom(HOSPITAL, pacs.endpoint)
    pacs.stop()
    went_down, outage_began = time.monotonic(), time.time()
    # The retry settings a hub runs with, except that the backoff stops growing at 10 s instead of
    # 60 s, so that the test ends soon after the PACS is back. The dead-letter limit is the default:
    # two minutes of refusals must not use it up.
    retries = {"relay_backoff_seconds": 0.5, "relay_backoff_max_seconds": 10.0}
    max_attempts = ImagingSettings.model_fields["relay_max_attempts"].default
    await gateway_apps(SEVERANCE)
    hub2 = await gateway_apps(SNUBH, relay_max_attempts=max_attempts, **retries)
    series = ct_series(tmp_path / "ct", 40, seed=11)
    study = study_of(series)
    patient = new_patient_key()
    consent_desk.consent(patient)
    await publish_exchange(nats_client, referral(study, patient))

    result = await asyncio.to_thread(
        dcmtk.scu, "storescu", "PACS11301001", imaging_federation.gateway(SEVERANCE), files=series
    )
    assert result.returncode == 0, result.stderr
    await until_count(hub2, study, "attempts", 2, timeout=60)

    # The outage lasts its full length; meanwhile nothing is given up and nothing arrives.
    await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - went_down)))
    waiting = await hub2.status(study)
    assert waiting is not None
    assert (waiting["queued"], waiting["delivered"], waiting["failed"]) == (40, 0, 0)
    assert 2 <= waiting["attempts"] < max_attempts
    assert pacs.files() == []

    start_storescp("+uf", port=pacs.endpoint.port, out_dir=pacs.out_dir)
    delivered = await until_count(hub2, study, "delivered", 40, timeout=60)
    assert (delivered["queued"], delivered["failed"], delivered["state"]) == (0, 0, "delivered")
    files = pacs.files()
    by_uid = {sop_uid(path): path.read_bytes() for path in files}
    assert len(files) == len(by_uid) == 40, "every instance exactly once"
    for path in series:
        assert dataset_bytes(by_uid[sop_uid(path)]) == dataset_bytes(path.read_bytes())

    # What an operator's log shows for the outage: one warning when the PACS stopped answering and one
    # when it answered again, no error line per retry; the retries are counted.
    destination = (
        f"{pacs.endpoint.ae_title}@{pacs.endpoint.host}:{pacs.endpoint.port}"  # as the relay logs it
    )
    during = [r for r in gateway_log if r.created >= outage_began]
    errors = [
        r for r in during if r.levelno >= logging.ERROR and r.name.startswith(("pynetdicom", "hie_imaging"))
    ]
    assert errors == [], [r.getMessage()[:200] for r in errors]
    warned = [
        r.msg["event"]
        for r in during
        if r.levelno == logging.WARNING and isinstance(r.msg, dict) and r.msg.get("endpoint") == destination
    ]
    assert warned == ["destination unreachable; relaying again with backoff", "destination reachable again"]
    assert (
        await hub2.metric("hie_imaging_relay_retries_total", destination=destination) >= waiting["attempts"]
    )
    assert await hub2.metric("hie_imaging_destinations_unreachable") == 0


# --- the spool disk is full --------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs to spool on (root only: mounting needs CAP_SYS_ADMIN)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs for the full-disk test needs root and mount(8)")
    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES},mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def spooled_files(spool: Path) -> list[Path]:
    return [path for path in spool.rglob("*") if path.is_file()]


async def test_full_spool_disk_refuses_with_out_of_resources_and_writes_nothing_half(
    imaging_federation: Federation,
    gateway_apps: StartGatewayApp,
    small_disk: Path,
    tmp_path: Path,
) -> None:
    spool = small_disk / "spool"
    # No reserve: the disk itself says when it is full (ENOSPC mid-write included).
    hub1 = await gateway_apps(SEVERANCE, spool_dir=spool, spool_min_free_bytes=0)
    series = ct_series(tmp_path / "ct", 100, seed=12)  # ~3.3 MB for a 2 MiB disk
    study = study_of(series)
    endpoint = imaging_federation.gateway(SEVERANCE)

    statuses = await asyncio.to_thread(send_files, endpoint, "PACS11301001", series, 30)
    stored = {uid for uid, status in statuses.items() if status == 0x0000}
    refused = {uid for uid, status in statuses.items() if status == OUT_OF_RESOURCES}
    assert len(statuses) == 100
    assert stored, "the disk was meant to take some instances"
    assert refused, "and to fill up part way"
    assert stored | refused == set(statuses), "only Success or Out of Resources (A700: try later)"

    # What was answered Success is recorded and spooled whole; of the refused, no byte remains.
    await until_count(hub1, study, "received", len(stored), timeout=60)
    status = await hub1.status(study)
    assert status is not None
    assert (status["received"], status["held"]) == (len(stored), len(stored))
    gateway = hub1.gateway
    for path in series:
        uid = sop_uid(path)
        if uid in stored:
            assert dataset_bytes(gateway.spool.read(uid)) == dataset_bytes(path.read_bytes())
        else:
            assert not gateway.spool.exists(uid)
    leftovers = [
        p.name for p in spooled_files(spool) if p.name.startswith(".tmp-") or p.parent.name == INCOMING
    ]
    assert leftovers == []

    # The operator makes room; the PACS sends the refused instances again and they are taken.
    subprocess.run(["mount", "-o", f"remount,size={8 * TMPFS_BYTES}", str(small_disk)], check=True)
    again = await asyncio.to_thread(
        send_files, endpoint, "PACS11301001", [p for p in series if sop_uid(p) in refused], 30
    )
    assert set(again.values()) == {0x0000}
    everything = await until_count(hub1, study, "received", 100, timeout=60)
    assert (everything["held"], everything["failed"]) == (100, 0)
