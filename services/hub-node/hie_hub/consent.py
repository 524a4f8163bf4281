"""The data holder's consent decisions: local, over the hub's replica of the consent feed.

The decision code is shared with the imaging gateways (``hie_platform.consent_gate``, design §4:
one replica code for every service that decides consent); this module keeps the hub's names.
"""

from __future__ import annotations

from hie_platform.consent_gate import CONSENT_DENIALS, ConsentGate, ConsentUnavailable

__all__ = ["CONSENT_DENIALS", "ConsentGate", "ConsentUnavailable"]
