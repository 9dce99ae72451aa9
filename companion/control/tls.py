"""How the device dials its control plane without giving its token to anyone else.

- ``wss://`` always verifies the server's certificate and host name; no setting turns that off.
  ``control_plane.ca_file`` names a private CA (PEM) that then replaces the system's CAs, so a
  fleet with its own CA trusts that CA only.
- The handshake is never logged at DEBUG (websockets would print the Authorization header).
- Redirects are never followed: the token goes to the host in ``control_plane.url`` and nowhere
  else (websockets would follow a same-origin redirect with the token and a cross-origin one
  without it; neither is the configured endpoint). A 3xx is a failed attempt that says where
  the server wanted the device to go, so the operator can fix the setting.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import connect as ws_connect

from companion.settings import ControlPlaneSettings

# websockets logs the handshake's headers at DEBUG, the Authorization header with the token
# among them: the link's own logger never goes below INFO, whatever the root logger does
WIRE_LOG = logging.getLogger("companion.control.wire")
WIRE_LOG.setLevel(logging.INFO)


def client_ssl(cp: ControlPlaneSettings) -> ssl.SSLContext | None:
    """The TLS context for a ``wss://`` url (None for ``ws://``). Reads the CA file: call it
    off the event loop."""
    if not cp.url or urlsplit(cp.url).scheme != "wss":
        return None
    context = ssl.create_default_context(cafile=str(cp.ca_file) if cp.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED  # create_default_context's own defaults, said again
    context.check_hostname = True
    return context


class connect_without_redirects(ws_connect):
    """``websockets.connect`` that treats every redirect as a refusal and never logs the
    handshake's headers."""

    def __init__(self, uri: str, **kwargs: Any) -> None:
        kwargs.setdefault("logger", WIRE_LOG)
        super().__init__(uri, **kwargs)

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc
