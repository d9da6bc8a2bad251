"""Rate limits on the real server over HTTP on loopback (SQLite and PostgreSQL): per client
address on registration and check-in, per device on every signed request, all counted in
the database so they hold across gunicorn workers and across servers sharing a database.

Faults by construction: every limit's window (an hour, or a minute for the per-device
limit) is far longer than the few sequential requests that fill it, and the windows start
at the first request, so which requests are refused never depends on timing. A second
client address is real: the loopback network is 127.0.0.0/8, so a socket bound to
127.0.0.2 reaches the server as another REMOTE_ADDR."""

import base64
import json
import tempfile

import pytest
import urllib3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_sdk.device_identity import DeviceIdentity
from device_sdk.sync_client import SyncClient, SyncError
from sync_server.config import ConfigError, load_config
from tests.support.server import ServerProcess
from trainer.simulation.server import GunicornServer

ADMIN = "limits-admin"
OTHER_ADDRESS = "127.0.0.2"


def new_client(server, source: str = "127.0.0.1", identity: DeviceIdentity | None = None
               ) -> SyncClient:
    """A device (a fresh key unless ``identity``) with a connection pool of its own bound to
    ``source`` (a new connection: under gunicorn any worker may accept it)."""
    keys = json.loads(server.request("GET", "/v1/server-keys").data)
    pool = urllib3.PoolManager(source_address=(source, 0))
    return SyncClient(server.url, identity or DeviceIdentity(Ed25519PrivateKey.generate()),
                      server_signing_key=base64.b64decode(keys["signing_key"]),
                      outbox_dir=tempfile.mkdtemp(), retries=0, pool=pool)


def register(client: SyncClient, headers: dict[str, str] | None = None
             ) -> urllib3.BaseHTTPResponse:
    body = {"public_key": base64.b64encode(client.identity.public_key_raw).decode()}
    return client.request("POST", "/v1/devices", json=body, headers=headers)


def error_code(response: urllib3.BaseHTTPResponse) -> str:
    return json.loads(response.data)["error"]["code"]


def test_a_registration_flood_is_refused_across_gunicorn_workers_and_servers(
        tmp_path, db_settings):
    """Two gunicorn servers (two workers each) on one database, requests alternating between
    them: exactly the limit's worth of registrations from one address get through in all.
    Counted per worker (or per server), twice as many or more would have."""
    database = db_settings.get("DATABASE_URL", f"sqlite:///{tmp_path / 'shared.db'}")
    settings = {"ADMIN_TOKEN": ADMIN, "DATABASE_URL": database, "RATE_LIMIT": 3,
                "REGISTER_LIMIT_PER_ADDRESS": "6 per hour"}
    with GunicornServer(tmp_path / "a", workers=2, threads=2, **settings) as a, \
            GunicornServer(tmp_path / "b", workers=2, threads=2, **settings) as b:
        servers = (a, b)
        responses = [register(new_client(servers[n % 2])) for n in range(10)]
        assert [r.status for r in responses] == [201] * 6 + [429] * 4
        for refused in responses[6:]:
            assert error_code(refused) == "rate_limited"
            assert "registrations from this client address" in json.loads(
                refused.data)["error"]["message"]
            assert 1 <= int(refused.headers["Retry-After"]) <= 3600

        # Another address is counted on its own.
        elsewhere = new_client(b, OTHER_ADDRESS)
        assert register(elsewhere).status == 201

        # The per-device limit (RATE_LIMIT 3 a minute) is shared too: the registration was
        # the first request, then one on each server, then the fourth is refused wherever.
        assert elsewhere.request("GET", "/v1/models/current").status == 404
        moved = new_client(a, OTHER_ADDRESS, elsewhere.identity)  # the same device, on a
        assert moved.request("GET", "/v1/models/current").status == 404
        refused = elsewhere.request("GET", "/v1/models/current")
        assert (refused.status, error_code(refused)) == (429, "rate_limited")
        assert 1 <= int(refused.headers["Retry-After"]) <= 60


def test_checkins_are_limited_per_address_across_devices(tmp_path, db_settings):
    with ServerProcess(tmp_path / "server", ADMIN_TOKEN=ADMIN,
                       CHECKIN_LIMIT_PER_ADDRESS="4 per hour",
                       REGISTER_LIMIT_PER_ADDRESS="100 per hour", **db_settings) as server:
        first, second = new_client(server), new_client(server)
        first.register()
        second.register()
        # No round is open: each check-in answers "no task", and counts.
        assert [c.checkin(None, 0) for c in (first, second, first, second)] == [None] * 4
        with pytest.raises(SyncError) as refused:
            second.checkin(None, 0)
        assert (refused.value.status, refused.value.code) == (429, "rate_limited")
        assert "check-ins from this client address" in refused.value.message

        elsewhere = new_client(server, OTHER_ADDRESS)
        elsewhere.register()
        assert elsewhere.checkin(None, 0) is None
        # Only check-in is limited: the same devices still register and read models.
        assert register(first).status == 200
        assert first.request("GET", "/v1/models/current").status == 404


def test_the_address_comes_from_x_forwarded_for_only_behind_trusted_proxies(tmp_path):
    def forwarded(address: str) -> dict[str, str]:
        return {"X-Forwarded-For": address}

    with ServerProcess(tmp_path / "proxied", REGISTER_LIMIT_PER_ADDRESS="2 per hour",
                       TRUSTED_PROXY_HOPS=1) as server:
        behind = [register(new_client(server), forwarded("198.51.100.7")) for _ in range(3)]
        assert [r.status for r in behind] == [201, 201, 429]
        assert register(new_client(server), forwarded("198.51.100.8")).status == 201
        # A spoofed entry before the proxy's own is not what counts: the last one is.
        spoofed = forwarded("203.0.113.1, 198.51.100.7")
        assert register(new_client(server), spoofed).status == 429
        # IPv6 clients count per /64: another address in the same block shares its limit.
        same_block = ["2001:db8:1:2::1", "2001:db8:1:2:ffff::9", "2001:db8:1:2::5"]
        assert [register(new_client(server), forwarded(a)).status for a in same_block] == [
            201, 201, 429]
        assert register(new_client(server), forwarded("2001:db8:1:3::1")).status == 201

    with ServerProcess(tmp_path / "direct", REGISTER_LIMIT_PER_ADDRESS="2 per hour") as server:
        # No trusted proxy: the header is the client's word and changes nothing.
        statuses = [register(new_client(server), forwarded(f"198.51.100.{n}")).status
                    for n in range(3)]
        assert statuses == [201, 201, 429]


def test_limit_settings_are_checked_when_the_server_starts():
    config = load_config({"REGISTER_LIMIT_PER_ADDRESS": "off",
                          "CHECKIN_LIMIT_PER_ADDRESS": "10/second;100 per hour"}, environ={})
    assert config["REGISTER_LIMIT_PER_ADDRESS"] is None
    assert config["CHECKIN_LIMIT_PER_ADDRESS"] == "10/second;100 per hour"
    assert config["TRUSTED_PROXY_HOPS"] == 0 and config["RATE_LIMIT_STORAGE"] == "database"
    for key, value in (("REGISTER_LIMIT_PER_ADDRESS", "lots"),
                       ("CHECKIN_LIMIT_PER_ADDRESS", "5 per fortnight"),
                       ("TRUSTED_PROXY_HOPS", -1), ("TRUSTED_PROXY_HOPS", "two"),
                       ("RATE_LIMIT_STORAGE", "redis")):
        with pytest.raises(ConfigError, match=key):
            load_config({key: value}, environ={})
