"""Which network interface each worker's Gloo uses: the one that holds its Ray node's IP.

Left to itself, Gloo advertises the address the host's name resolves to, which on a stock
Debian/Ubuntu host (``127.0.1.1 hostname`` in /etc/hosts) is loopback: workers on other hosts then
cannot connect ("Gloo connectFullMesh failed ... remote=[127.0.0.1]"). Ray knows the IP every node
is reached at; each worker sets ``GLOO_SOCKET_IFNAME`` to the interface holding it before Ray Train
creates the process group. A ``GLOO_SOCKET_IFNAME`` the worker already has (exported before
``ray start``) is kept. On an embedded Ray, whose workers all run on this machine, Gloo listens on
loopback only.

psutil comes with Ray (``ray/thirdparty_files``, on the path once ray is imported).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass

from ray.train.torch.config import TorchConfig, _TorchBackend

VARIABLE = "GLOO_SOCKET_IFNAME"


def interface_of(ip: str) -> str | None:
    """The name of this host's network interface that holds ``ip`` (None if none does)."""
    import psutil

    wanted = ipaddress.ip_address(ip)
    for name, addresses in psutil.net_if_addrs().items():
        for address in addresses:
            if address.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                if ipaddress.ip_address(address.address.split("%")[0]) == wanted:
                    return name
            except ValueError:
                continue
    return None


def node_interface() -> tuple[str, str | None]:
    """This Ray node's IP and the interface Gloo will use for it (the preset one, if any)."""
    import ray.util

    ip = ray.util.get_node_ip_address()
    return ip, os.environ.get(VARIABLE) or interface_of(ip)


def use_node_interface(local_only: bool = False) -> None:
    """Run on each worker before the process group exists: point Gloo at the node's interface
    (with ``local_only``, at loopback)."""
    if os.environ.get(VARIABLE):
        return
    ip, name = ("127.0.0.1", interface_of("127.0.0.1")) if local_only else node_interface()
    if name is None:
        raise RuntimeError(
            f"no network interface on {socket.gethostname()} holds this Ray node's IP {ip}; "
            f"export {VARIABLE} before 'ray start' on that node"
        )
    os.environ[VARIABLE] = name


class _Backend(_TorchBackend):
    def on_start(self, worker_group, backend_config) -> None:
        worker_group.execute(use_node_interface, local_only=backend_config.local_only)
        super().on_start(worker_group, backend_config)


@dataclass
class GlooConfig(TorchConfig):
    """Ray Train's TorchConfig for CPU workers: gloo, on each node's own interface (loopback
    with ``local_only``: every worker on this machine)."""

    backend: str = "gloo"
    local_only: bool = False

    @property
    def backend_cls(self):
        return _Backend
