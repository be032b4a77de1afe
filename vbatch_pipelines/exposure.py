"""Where `vbatch up` listens, and what it refuses to expose: the API beyond loopback only with keys, the Dagster
UI (no authentication of its own) only when asked, its webserver on a hidden loopback address behind its guard,
and no port another process holds."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from vbatch_pipelines.settings import Settings

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class ExposureError(ValueError):
    """`up` was asked to listen beyond this machine without what makes that safe."""


def _reachable(host: str) -> str:
    """The address a local client uses for a server listening on ``host``."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class Addresses:
    host: str  # where the API listens
    api_port: int
    dagster_port: int
    expose_dagster: bool = False  # the Dagster UI has no authentication: beyond loopback only when asked

    @property
    def dagster_host(self) -> str:
        return self.host if self.expose_dagster else "127.0.0.1"

    @property
    def api_url(self) -> str:
        return f"http://{_reachable(self.host)}:{self.api_port}"

    @property
    def dagster_url(self) -> str:
        return f"http://{_reachable(self.dagster_host)}:{self.dagster_port}"

    @property
    def exposed(self) -> bool:
        return self.host not in LOOPBACK_HOSTS

    def check(self, settings: Settings) -> list[str]:
        """Refuse an API on the network without keys; return what the start-up banner must say about it."""
        if not self.exposed:
            return []
        if not settings.api.keys and not settings.api.admin_keys:
            raise ExposureError(f"--host {self.host} would let anyone who can reach this machine use vbatch: set "
                                "VBATCH_API_KEYS (and VBATCH_ADMIN_KEYS) first, or keep the default 127.0.0.1")
        if self.expose_dagster:
            return [f"The Dagster UI listens on {self.host} without authentication (--expose-dagster): "
                    "put it behind an authenticating proxy"]
        return [f"The API listens on {self.host}; the Dagster UI stays on 127.0.0.1 (it has no authentication; "
                "--expose-dagster serves it on the network)"]


def check_ports(addresses: Addresses, resources: dict) -> None:
    """The ports `up` listens on, and its Label Studio's unless that one already runs (adopted): free, or
    PortTaken naming the process that holds it (another home's API, Dagster or Label Studio) and the setting
    that moves ours. Never a server that starts beside another one and answers nobody (or 401s forever)."""
    from vbatch_pipelines.net import check_port_free

    check_port_free(addresses.host, addresses.api_port, "the API", "--api-port (or VBATCH_API_PORT)")
    check_port_free(addresses.dagster_host, addresses.dagster_port, "the Dagster UI",
                    "--dagster-port (or VBATCH_DAGSTER_PORT)")
    label_studio = resources.label_studio
    server = label_studio.server() if label_studio.enabled else None
    if server is not None and not server.healthy():
        check_port_free("127.0.0.1", server.port, "Label Studio", "VBATCH_LABEL_STUDIO_PORT")


def hidden_loopback_address() -> tuple[str, int]:
    """Where the Dagster webserver listens behind its guard (api.dagster_proxy): a free port on an address of
    127.0.0.0/8 drawn at random on Linux (which answers all of it), so no page can guess it to send it a
    request, rebound name or not; 127.0.0.1 elsewhere."""
    import secrets

    from vbatch_pipelines.net import free_port

    host = "127.0.0.1"
    if sys.platform.startswith("linux"):
        host = "127." + ".".join(str(1 + secrets.randbelow(254)) for _ in range(3))
    return host, free_port(host)
