"""Write the NATS accounts file of the central overlay: one account per hub, imports as permissions.

    .venv/bin/python deploy/k8s/nats_accounts.py            # rewrite overlays/central/nats/accounts.conf
    .venv/bin/python deploy/k8s/nats_accounts.py --check    # exit 1 if the committed file is stale

The hubs are the ``overlays/hub-<slug>`` directories, so adding a hub is: copy an overlay, rerun
this, add the hub's password to the ``nats-users`` Secret. What each user may do is generated from
the bus contract (hie_schemas.contract: message kinds, RPC operations, durable consumers) by
hie_platform.nats_accounts, the same generator the local run uses; the reasoning is written into the
generated file's comments, where an operator reading the server configuration will look for it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

K8S = Path(__file__).resolve().parent
ROOT = K8S.parents[1]
OUTPUT = K8S / "overlays" / "central" / "nats" / "accounts.conf"
# Run from a checkout without installing: the two pure libraries the generator needs.
for lib in (ROOT / "libs" / "schemas", ROOT / "libs" / "platform"):
    if str(lib) not in sys.path:
        sys.path.insert(0, str(lib))

from hie_platform.nats_accounts import SlugError, render  # noqa: E402


def hubs() -> list[str]:
    return sorted(p.name.removeprefix("hub-") for p in (K8S / "overlays").glob("hub-*") if p.is_dir())


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed file is stale")
    args = parser.parse_args()
    try:
        text = render(hubs())
    except SlugError as exc:
        sys.stderr.write(f"overlays/hub-*: {exc}\n")
        return 1
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            sys.stderr.write(f"{OUTPUT.relative_to(K8S)} is stale: run python {Path(__file__).name}\n")
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    sys.stdout.write(f"wrote {OUTPUT.relative_to(K8S)} for hubs: {', '.join(hubs())}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
