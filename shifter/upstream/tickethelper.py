"""
The ticket helper: a short-lived process that logs in to the KDC with the
gateway's keytab and leaves a credential cache holding its ticket-granting
ticket and its service ticket for the proxy.

Shifter runs it with C{python -m shifter.upstream.tickethelper} from
L{shifter.upstream.kerberos.TicketKeeper}, never in its own process: the
Kerberos library waits on the KDC's network I/O, which the reactor must
not.  The new cache is written beside the old one and renamed over it, so
the reactor never reads half a cache.

It prints one JSON line: C{{"principal", "target", "expires"}} (the
gateway's principal, the proxy's service principal and when the first of
the two tickets runs out, in seconds since the epoch), or C{{"error"}}
with the reason in words.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any


def gssReason(error: Exception) -> str:
    """
    The words of a GSS error's minor status (the Kerberos library's own
    reason, such as C{Cannot contact any KDC for realm 'EXAMPLE.COM'}),
    else of its major status.
    """
    minor = getattr(error, "min_code", 0)
    major = getattr(error, "maj_code", 0)
    try:
        if minor:
            words = error.get_all_statuses(minor, False)  # type: ignore[attr-defined]
        else:
            words = error.get_all_statuses(major, True)  # type: ignore[attr-defined]
        text = "; ".join(w.decode() if isinstance(w, bytes) else str(w) for w in words if w)
    except Exception:
        text = ""
    return text or str(error)


def obtain(keytab: str, principal: str | None, ccache: str, service: str) -> dict[str, Any]:
    """
    Log in as C{principal} (the keytab's first one if C{None}) and get a
    ticket for C{service}, into the cache file C{ccache}.

    @param service: the proxy's service principal, C{HTTP/host}; the
        gateway's own realm is added when it names none.
    """
    import gssapi

    try:
        with open(keytab, "rb"):
            pass
    except OSError as e:
        return {"error": f"cannot read the keytab {keytab}: {e.strerror}"}
    fresh = ccache + ".new"
    try:
        os.unlink(fresh)
    except FileNotFoundError:
        pass
    store: dict[bytes | str, bytes | str] = {"client_keytab": keytab, "ccache": "FILE:" + fresh}
    name = gssapi.Name(principal, gssapi.NameType.kerberos_principal) if principal else None
    login = f"cannot log in as {principal}" if principal else "cannot log in"
    step = login
    try:
        if name is not None:
            # The keytab must hold a key for the principal: asked as an
            # acceptor, the library says so in plain words, with no KDC.
            step = f"cannot find {principal} in the keytab {keytab}"
            gssapi.Credentials(name=name, usage="accept", store={"keytab": keytab})
            step = login
        creds = gssapi.Credentials(name=name, usage="initiate", store=store, mechs=[gssapi.MechType.kerberos])
        # Asking for the lifetime makes the library fetch the ticket-granting
        # ticket from the keytab now.
        lifetime = creds.lifetime
        client = str(creds.name)
        realm = client.rpartition("@")[2]
        target = service if "@" in service else f"{service}@{realm}"
        step = f"cannot get a ticket for {target} as {client}"
        context = gssapi.SecurityContext(
            name=gssapi.Name(target, gssapi.NameType.kerberos_principal),
            creds=creds,
            usage="initiate",
            mech=gssapi.MechType.kerberos,
            flags=gssapi.RequirementFlag.out_of_sequence_detection,
        )
        context.step()
        lifetime = min(lifetime, context.lifetime)
    except gssapi.exceptions.GSSError as e:
        return {"error": f"{step}: {gssReason(e)}"}
    os.chmod(fresh, 0o600)
    os.rename(fresh, ccache)
    return {"principal": client, "target": target, "expires": time.time() + lifetime}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shifter.upstream.tickethelper")
    parser.add_argument("--keytab", required=True)
    parser.add_argument("--principal")
    parser.add_argument("--ccache", required=True)
    parser.add_argument("--service", required=True)
    args = parser.parse_args(argv)
    try:
        result = obtain(args.keytab, args.principal, args.ccache, args.service)
    except Exception as e:  # one line for the log, whatever went wrong
        result = {"error": f"ticket helper failed: {e.__class__.__name__}: {e}"}
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
