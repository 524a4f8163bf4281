"""A multi-host federation on one machine (issue 7): central, hub 1 and hub 2 as network namespaces.

Each host has its own address; NATS is a three-server JetStream cluster (one server per host) with
the central overlay's accounts and per-hub users; PostgreSQL runs on the central host; every service
runs with the environment the dev overlay gives its container. Then the referral scenario with a CT
study runs across the hosts, and hub 1's NATS user is refused on hub 2's subjects.
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from multihost_hosts import base_env, environ_of
from multihost_render import HOSTS, NATS_PODS, under_mount, without_addresses
from multihost_support import (
    ADDRESS_SETTINGS,
    MOUNT_SETTINGS,
    MultiHost,
    iter_hie,
    start_pacs_in,
)

from hie_cli.demo import Api, DemoResult, Scenario, demo_rrn
from hie_cli.federation import Federation
from hie_schemas.identifiers import RRN_SYSTEM

pytestmark = pytest.mark.e2e

HUB1, HUB2 = "severance", "snubh"


def _deploy_k8s_helpers() -> Any:
    path = Path(__file__).resolve().parents[1] / "deploy" / "k8s_helpers.py"
    spec = importlib.util.spec_from_file_location("multihost_deploy_k8s_helpers", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_process_runs_with_the_overlays_settings(multihost: MultiHost) -> None:
    """The environment each process was started with is the rendered one; only addresses (Service
    names -> the host's IP and the container port) and paths inside volume mounts differ."""
    assert set(multihost.network.ips) == set(HOSTS)
    assert len(set(multihost.network.ips.values())) == len(HOSTS)
    # What the overlay says, computed again by tests/deploy's kubelet emulation (not ours).
    helpers = _deploy_k8s_helpers()
    as_deployed = helpers.Rendered("dev", multihost.rendered.docs)
    checked = 0
    for proc in [*multihost.services.values(), *multihost.migrations.values()]:
        assert proc.rendered_env == helpers.container_env(as_deployed, proc.workload, proc.container), (
            proc.name
        )
        running = proc.process.poll() is None
        # A running service's environment as the kernel holds it; a finished init container's as given.
        actual = environ_of(proc.process.pid) if running else proc.env
        hie = dict(iter_hie(actual))
        assert hie.keys() == proc.rendered_env.keys(), proc.name
        for key, value in hie.items():
            expected = proc.rendered_env[key]
            if value == expected:
                continue
            if key.endswith(ADDRESS_SETTINGS):
                assert without_addresses(value) == without_addresses(expected), (proc.name, key)
                assert ".svc.cluster.local" not in value
                assert any(ip in value for ip in multihost.network.ips.values()), (proc.name, key, value)
            else:
                assert key.endswith(MOUNT_SETTINGS), f"{proc.name}: {key}={value!r}, overlay {expected!r}"
                assert under_mount(proc.container, expected), (proc.name, key, expected)
            checked += 1
    # Registry/consent/hub-node/gateway x (service + init container), on their own hosts.
    assert len(multihost.services) == 6
    assert len(multihost.migrations) == 6
    assert {p.host for p in multihost.services.values()} == set(HOSTS)
    assert checked > 0
    # The hubs are who the overlays say they are, on the hosts they run on.
    for host, slug in (("hub1", HUB1), ("hub2", HUB2)):
        node = multihost.services[f"hub-node-hub-{slug}"]
        gateway = multihost.services[f"imaging-gateway-hub-{slug}"]
        assert node.host == gateway.host == host
        assert environ_of(node.process.pid)["HIE_HUB_HUB"] == slug
        assert environ_of(gateway.process.pid)["HIE_IMAGING_AE_TITLE"] == f"GW_{slug.upper()}"
        assert environ_of(node.process.pid)["HIE_HUB_NATS_USER"] == f"hub-{slug}"


def test_nats_is_a_three_server_jetstream_cluster_across_the_hosts(multihost: MultiHost) -> None:
    # The rendered nats.conf ran with only the routes (pod names -> IPs) and the volume paths changed.
    assert sorted(line.strip() for line in multihost.nats_changed_lines) == [
        "nats://nats-0.nats-headless:6222",
        "nats://nats-1.nats-headless:6222",
        "nats://nats-2.nats-headless:6222",
        "pid_file: /var/run/nats/nats.pid",
        "store_dir: /data",
    ]
    names = set()
    for pod, proc in multihost.nats.items():
        assert proc.host == NATS_PODS[pod]
        # Exactly the StatefulSet's environment (POD_NAME, GOMEMLIMIT, the nats-users passwords).
        actual = environ_of(proc.process.pid)
        assert {k: v for k, v in actual.items() if k not in base_env()} == proc.rendered_env
        assert proc.rendered_env["POD_NAME"] == pod
        varz = httpx.get(f"{proc.url}/varz", timeout=10, trust_env=False).json()
        names.add(varz["server_name"])
        assert varz["cluster"]["name"] == "hie"
        routes = httpx.get(f"{proc.url}/routez", timeout=10, trust_env=False).json()["routes"]
        peers = {r["ip"] for r in routes}
        others = {multihost.network.ips[h] for p, h in NATS_PODS.items() if p != pod}
        assert others <= peers, f"{pod} routes to {peers}, not to {others}"
        jsz = httpx.get(f"{proc.url}/jsz", timeout=10, trust_env=False).json()
        assert jsz["meta_cluster"]["cluster_size"] == 3
    assert names == set(NATS_PODS)


class AcrossHosts(Scenario):
    """The demo scenario (hie_cli.demo) from a clinic of hub 1 to a clinic of hub 2, with that
    clinic's PACS on hub 2's host (its loopback), not in the test process's network."""

    def __init__(
        self, federation: Federation, api: Api, instances: int, pacs_netns: str, sender_host: str
    ) -> None:
        super().__init__(federation, api, instances)
        # The sending clinic's PACS is this test process, whose connections reach hub 1's host from
        # the bridge's address: the gateway serves a registered AE title only from its registered host.
        self.sender_host = sender_host
        # The demo refers to hub 2's hospital; here the recipient is one of hub 2's clinics.
        self.hospital = next(
            i for i in federation.institutions if i.kind == "clinic" and i.hub == self.hub2.slug
        )
        self.pacs_netns = pacs_netns
        self.pacs: Any = None

    async def run(self) -> DemoResult:
        registered = await self.api.call(
            "PUT",
            f"{self.f.registry_url}/institutions/{self.clinic.code}/dicom",
            self.agency,
            json={"ae_title": self.clinic.dicom_ae, "host": self.sender_host, "port": 104},
        )
        assert registered.status_code == 200, registered.text
        self.pacs = await asyncio.to_thread(start_pacs_in, self.pacs_netns, "DEMO_PACS")
        try:
            await self._run(self.pacs)
        finally:
            await asyncio.to_thread(self.pacs.stop)
        return self.result


async def test_referral_with_ct_from_hub1_reaches_the_pacs_behind_hub2(multihost: MultiHost) -> None:
    federation: Federation = multihost.federation
    hub1, hub2 = federation.hubs
    assert (hub1.slug, hub2.slug) == (HUB1, HUB2)
    # The registry tells every node where the hubs are: their own hosts, never loopback.
    assert hub1.gateway.host == multihost.network.ips["hub1"]
    assert hub2.gateway.host == multihost.network.ips["hub2"]
    assert hub2.fhir_base.startswith(f"http://{multihost.network.ips['hub2']}:")

    seed = uuid.uuid4().int
    async with httpx.AsyncClient(timeout=60.0, trust_env=False) as http:
        api = Api(federation, http)
        scenario = AcrossHosts(
            federation, api, 12, multihost.network.namespaces["hub2"], multihost.network.gateway_ip
        )
        scenario.rng = random.Random(seed)  # its first draw is the patient's RRN
        try:
            result = await scenario.run()
        except Exception:
            # What the hubs' services said is what tells why; pytest shows it with the failure.
            for name, proc in multihost.services.items():
                if name.startswith(("imaging-gateway", "hub-node")):
                    print(f"--- {name} (last lines of {proc.log})\n{proc.last_lines(40)}")
            raise

        # Hub 2's links name an address the other hosts reach (the overlay's PUBLIC_URL): page
        # through the patient's documents there, one per page, from outside hub 2's host.
        rrn = demo_rrn(random.Random(seed))
        url: str | None = f"{hub2.fhir_base}/DocumentReference"
        params: dict[str, str] | None = {"patient.identifier": f"{RRN_SYSTEM}|{rrn}", "_count": "1"}
        pages = 0
        while url is not None:
            assert url.startswith(hub2.fhir_base), url
            page = await api.call("GET", url, scenario.hospital, params=params)
            assert page.status_code == 200, page.text[:300]
            bundle = page.json()
            pages += 1
            for entry in bundle.get("entry", []):
                assert entry["fullUrl"].startswith(hub2.fhir_base), entry["fullUrl"]
            links = {link["relation"]: link["url"] for link in bundle.get("link", [])}
            url, params = links.get("next"), None
        assert pages >= 2  # the referral and the care record summary, a page each

    assert scenario.clinic.hub == HUB1
    assert scenario.hospital.hub == HUB2
    assert scenario.hospital.kind == "clinic"
    assert result.referral_task_id
    assert result.documents_read == 2  # the referral and the care record summary, retrieved at hub 2
    assert result.instances_sent == 12
    assert result.instances_identical == 12  # every CT instance reached hub 2's PACS, pixels identical
    assert {"referral", "return"} <= set(result.history_kinds)
    assert result.refused_status == 403
    assert result.refused_found_at_hub2 == 0
    assert result.refused_instances_at_pacs == 0
    assert result.refused_study_relayed == 0

    # The PACS listened on hub 2's loopback: from outside hub 2's host it cannot be reached at all, so
    # only hub 2's gateway could have delivered to it.
    outside = (multihost.network.ips["hub2"], scenario.pacs.port)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(outside, timeout=10):
        pass


async def test_a_hub_is_refused_when_it_publishes_on_another_hubs_subjects(multihost: MultiHost) -> None:
    """hub 1's NATS user (from its overlay's secret), on hub 1's server, publishes as if it were hub 2."""
    node = multihost.services[f"hub-node-hub-{HUB1}"]
    url = environ_of(node.process.pid)["HIE_HUB_NATS_URL"]  # nats://hub-severance:…@<hub1 ip>:4222
    assert url.endswith(f"@{multihost.network.ips['hub1']}:4222")
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(url, error_cb=on_error, connect_timeout=10, allow_reconnect=False)
    try:
        # Allowed, as a control: consent's heartbeat (published on the central server) reaches hub 1.
        sub = await nc.subscribe("hie.feed.consent.heartbeat")
        await sub.next_msg(timeout=30)
        await sub.unsubscribe()
        forbidden = [
            f"hie.hub.{HUB2}.imaging.relay",  # hub 2's gateway's work queue
            f"hie.hub.{HUB2}.inbox.other",  # an inbox kind hubs do not send each other
            f"hie.hub.{HUB2}.rpc.purge",  # an rpc of hub 2's that is not exported
        ]
        for subject in forbidden:
            await nc.publish(subject, b"{}")
        await nc.flush(timeout=10)
        deadline = asyncio.get_running_loop().time() + 30
        while len(errors) < len(forbidden) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
    for subject in forbidden:
        refusal = f'permissions violation for publish to "{subject}"'
        assert any(refusal in e.lower() for e in errors), errors
    # The refusal is logged by the server hub 1 is connected to.
    log = multihost.nats["nats-1"].log.read_text(errors="replace")
    for subject in forbidden:
        assert any(
            "Publish Violation" in line and f"hub-{HUB1}" in line and subject in line
            for line in log.splitlines()
        ), f"nats-1 did not log the refusal of {subject}"


def test_no_process_logged_a_traceback(multihost: MultiHost) -> None:
    for proc in [*multihost.services.values(), *multihost.migrations.values()]:
        text = proc.log.read_text(errors="replace")
        assert "Traceback" not in text, f"{proc.name} logged a traceback:\n{text[-3000:]}"
    for proc in multihost.services.values():
        assert proc.process.poll() is None, f"{proc.name} exited:\n{proc.last_lines()}"
