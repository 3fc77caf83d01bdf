"""Keep servers that have no bind option (DCMTK 3.6.7's storescp) on 127.0.0.1.

A tiny LD_PRELOAD library turns bind() to INADDR_ANY into bind() to 127.0.0.1, so test
servers never listen on other interfaces. It is compiled once per test session with gcc.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path


SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real_bind;
    if (!real_bind) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
    if (addr && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in a;
        memcpy(&a, addr, sizeof a);
        if (a.sin_addr.s_addr == htonl(INADDR_ANY)) a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        return real_bind(fd, (const struct sockaddr *)&a, sizeof a);
    }
    return real_bind(fd, addr, len);
}
"""

_built: str | None = None


def _gcc() -> str:
    """gcc, as the tests require it (a failure under CI=true); benchmarks, which run without
    the test extras (no pytest), just need it on PATH."""
    try:
        from conftest import require_tool
    except ImportError:
        import shutil

        gcc = shutil.which("gcc")
        if gcc is None:
            raise SystemExit("gcc is needed to build the loopback shim (apt-get install gcc)") from None
        return gcc
    return require_tool("gcc")


def loopback_env(env: dict | None = None) -> dict:
    """An environment whose processes bind their listening sockets to 127.0.0.1 only."""
    global _built
    if _built is None or not os.path.exists(_built):
        gcc = _gcc()
        d = Path(tempfile.mkdtemp(prefix="dtools-loopback-"))
        (d / "loopback.c").write_text(SHIM)
        subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-o", str(d / "libloopback.so"), str(d / "loopback.c"), "-ldl"],
                       check=True, capture_output=True)
        _built = str(d / "libloopback.so")
    out = dict(os.environ if env is None else env)
    out["LD_PRELOAD"] = _built
    return out


def listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a socket listening on ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state = fields[1], fields[3]
        ip_hex, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            ip = ".".join(str(int(ip_hex[i:i + 2], 16)) for i in (6, 4, 2, 0))
            found.add(ip)
    return found
