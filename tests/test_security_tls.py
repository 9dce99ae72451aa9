"""The control-plane link over TLS: certificates always verified, a private CA by setting, the
token only to the configured host (no redirects). Real websockets servers on 127.0.0.1 with a
test CA (trustme)."""

from __future__ import annotations

import contextlib
import json
import ssl

import pytest
import trustme
from aiohttp import web
from websockets.asyncio.server import serve

from tests.conftest import until
from tests.control_helpers import TOKEN, linked_device


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


class Plane:
    """A minimal control plane that records what reaches it (headers and frames)."""

    def __init__(self) -> None:
        self.authorizations: list[str] = []
        self.frames: list[dict] = []

    async def handler(self, ws) -> None:
        self.authorizations.append(ws.request.headers.get("Authorization", ""))
        async for raw in ws:
            self.frames.append(json.loads(raw))


@contextlib.asynccontextmanager
async def tls_plane(ca: trustme.CA, *names: str):
    plane = Plane()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    async with serve(plane.handler, "127.0.0.1", 0, ssl=context) as server:
        plane.port = server.sockets[0].getsockname()[1]
        yield plane


@pytest.fixture
def ca_file(ca, tmp_path):
    path = tmp_path / "fleet-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


async def test_wss_with_the_private_ca_connects_and_sends_the_token(tmp_path, ca, ca_file):
    async with tls_plane(ca, "localhost", "127.0.0.1") as plane, linked_device(
            tmp_path, f"wss://localhost:{plane.port}", cp={"ca_file": ca_file}) as (_, link):
        await until(lambda: plane.frames)
        assert plane.frames[0]["type"] == "hello"
        assert plane.authorizations == [f"Bearer {TOKEN}"]
        assert link.status.connected


async def test_a_certificate_no_trusted_ca_signed_is_refused(tmp_path, ca):
    # the system CAs do not know the test CA: no connection, no token sent
    async with tls_plane(ca, "localhost") as plane, linked_device(
            tmp_path, f"wss://localhost:{plane.port}") as (_, link):
        await until(lambda: link.status.retries >= 2)
        assert "CERTIFICATE_VERIFY_FAILED" in (link.status.last_error or "")
        assert plane.authorizations == [] and not link.status.connected


async def test_a_certificate_for_another_host_is_refused(tmp_path, ca, ca_file):
    async with tls_plane(ca, "other.example") as plane, linked_device(
            tmp_path, f"wss://localhost:{plane.port}", cp={"ca_file": ca_file}) as (_, link):
        await until(lambda: link.status.retries >= 2)
        assert "localhost" in (link.status.last_error or "")  # hostname mismatch, named
        assert plane.authorizations == []


def test_a_ca_file_that_is_not_a_ca_bundle_is_a_settings_error(tmp_path):
    from pydantic import ValidationError

    from companion.settings import ControlPlaneSettings

    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ValidationError, match="CA bundle"):
        ControlPlaneSettings(url="wss://cp.example", ca_file=bad)


@pytest.mark.parametrize("cross_origin", [True, False])
async def test_redirects_are_not_followed(tmp_path, cross_origin):
    target = Plane()
    async with serve(target.handler, "127.0.0.1", 0) as server:
        target_port = server.sockets[0].getsockname()[1]
        redirector = web.Application()
        seen: list[tuple[str, str]] = []  # (path, Authorization) of each request

        async def redirect(request: web.Request) -> web.Response:
            seen.append((request.path, request.headers.get("Authorization", "")))
            where = (f"ws://127.0.0.1:{target_port}/ws/dev-a" if cross_origin
                     else "/moved/ws/dev-a")
            raise web.HTTPFound(where)

        redirector.router.add_get("/{tail:.*}", redirect)
        runner = web.AppRunner(redirector)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with linked_device(tmp_path, f"ws://127.0.0.1:{port}") as (_, link):
                await until(lambda: link.status.retries >= 2)
                assert "redirect" in (link.status.last_error or "")
                assert seen and all(request == ("/ws/dev-a", f"Bearer {TOKEN}")
                                    for request in seen)  # never the path it was sent to
                assert target.authorizations == []  # nor the other host
        finally:
            await runner.cleanup()
