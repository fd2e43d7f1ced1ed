"""Container health probe: exit 0 when GET http://127.0.0.1:$SRCID_PORT<path> answers 2xx, else exit 1.

Usage: python healthcheck.py [/healthz|/readyz]. Standard library only, so the image needs no curl; Docker's
HEALTHCHECK and the compose file's healthchecks both call it. The reason for a failure goes to stdout, which
`docker inspect --format '{{json .State.Health}}'` shows.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0


def probe(path: str, port: str) -> tuple[bool, str]:
    """(healthy, one-line reason) for GET http://127.0.0.1:<port><path>."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return True, f"{url}: {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: {exc.code} {exc.read(300).decode('utf-8', 'replace')}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {exc}"


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/healthz"
    if not path.startswith("/"):
        print(f"healthcheck: path must start with '/', got {path!r}")
        return 1
    healthy, reason = probe(path, os.environ.get("SRCID_PORT", "8000"))
    print(reason)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
