"""The container image's HEALTHCHECK: GET /healthz on edgeproxy's metrics listener.

Exit 0 on HTTP 200, 1 otherwise (Docker's contract). Standard library only, so the image needs no
curl. The address is read from EDGEPROXY_METRICS_LISTEN, the variable edgeproxy itself listens
on, so a `docker run -e EDGEPROXY_METRICS_LISTEN=...` moves the check with it. Usage:
``edgeproxy-healthcheck [PATH]``, PATH defaulting to /healthz (/readyz asks whether the backend
answers too).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

# A wildcard listener is reached on loopback from inside the container.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def url(listen: str, path: str) -> str:
    """``http://host:port/path`` for the first address of an EDGEPROXY_METRICS_LISTEN value."""
    first = listen.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    host = _WILDCARDS.get(host, host)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{path}"


def main(argv: list[str]) -> int:
    listen = os.environ.get("EDGEPROXY_METRICS_LISTEN", "").strip()
    if not listen:
        # Metrics switched off on purpose: there is nothing to ask, and calling the container
        # unhealthy for it would only get it restarted in a loop.
        print("EDGEPROXY_METRICS_LISTEN is empty: no health endpoint to check")
        return 0
    target = url(listen, argv[1] if len(argv) > 1 else "/healthz")
    # No proxy: an http_proxy set for the container's other traffic must not carry this one.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(target, timeout=3) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except OSError as error:
        print(f"{target}: {error}")
        return 1
    print(f"{target}: {status}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
