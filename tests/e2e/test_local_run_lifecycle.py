"""A newcomer's foot-guns with `hie up`: a second federation on the same data directory, and the
address book a stopped federation would leave behind (issue 15, points 1 and 2). Real processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def hie(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hie_cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start(data: Path, log: Path, hubs: int = 1) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "hie_cli.main", "up", "--data-dir", str(data), "--hubs", str(hubs)],
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    out.close()
    deadline = time.monotonic() + 120
    while not (data / "federation.json").exists():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the federation did not come up in 120 s"
        time.sleep(0.2)
    return process


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail("hie up did not stop within 60 s of Ctrl-C")


def test_a_second_federation_on_the_same_data_directory_is_refused_and_writes_nothing(
    tmp_path: Path,
) -> None:
    data = tmp_path / "hie"
    first = start(data, tmp_path / "first.log")
    try:
        book = (data / "federation.json").read_bytes()
        topology = (data / "topology.json").read_bytes()
        registry = json.loads(book)["registry_url"]
        second = hie("up", "--data-dir", str(data), "--hubs", "1")
        assert second.returncode == 1
        message = second.stderr.strip()
        assert message.count("\n") == 0, second.stderr  # one readable line
        assert f"pid {first.pid}" in message
        assert registry in message
        # Nothing of the first federation's was rewritten, and it still answers.
        assert (data / "federation.json").read_bytes() == book
        assert (data / "topology.json").read_bytes() == topology
        assert httpx.get(f"{registry}/readyz", timeout=5).status_code == 200
        assert first.poll() is None
    finally:
        assert stop(first) == 0


def test_a_stopped_federation_leaves_no_address_book_and_a_stale_one_is_one_line(tmp_path: Path) -> None:
    data = tmp_path / "hie"
    process = start(data, tmp_path / "launcher.log", hubs=2)  # what `hie demo` needs
    book = (data / "federation.json").read_text()
    assert stop(process) == 0
    assert not (data / "federation.json").exists()

    demo = hie("demo", "--data-dir", str(data))
    assert demo.returncode == 1
    assert demo.stderr.strip().count("\n") == 0, demo.stderr
    assert "start the federation first" in demo.stderr

    # A federation killed without a clean stop (SIGKILL, a power cut) leaves its book behind.
    (data / "federation.json").write_text(book)
    demo = hie("demo", "--data-dir", str(data))
    assert demo.returncode == 1
    assert demo.stderr.strip().count("\n") == 0, demo.stderr
    assert demo.stderr.startswith("hie demo: nothing answers at http://127.0.0.1:")
    assert "Traceback" not in demo.stderr
    listing = hie("registry", "list", "--data-dir", str(data))
    assert listing.returncode == 1
    assert listing.stderr.strip().count("\n") == 0, listing.stderr
    assert "cannot reach the registry" in listing.stderr

    # The directory is free again: a new federation starts on it and reuses its data (the stale book
    # is removed here only so that start() waits for the new one).
    (data / "federation.json").unlink()
    again = start(data, tmp_path / "again.log")
    assert stop(again) == 0
