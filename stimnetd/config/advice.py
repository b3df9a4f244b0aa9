"""Settings that are valid but probably not what the operator meant: warnings, not errors.

Each is one line naming the file, the key and why; `stimnetd check-config` prints them and
the daemon logs them at start-up."""

from __future__ import annotations

import ipaddress

from stimnetd.config.load import Config


def config_warnings(config: Config) -> list[str]:
    at = f"{config.source}: "
    out: list[str] = []
    listen = config.metrics.listen
    if listen is not None:
        host = listen.rpartition(":")[0].strip("[]")
        if not _loopback(host):
            out.append(f"{at}[metrics].listen: {listen} is not a loopback address; the metrics "
                       "endpoint has no TLS and no authentication, and what it shows (jobs, "
                       "epsilon spent, peers) is for this site's operators: keep it on "
                       "127.0.0.1 and scrape it locally or through a tunnel")
    if not config.node.admins:
        out.append(f"{at}[node].admins: no admin is named, so no admin certificate is obeyed "
                   "here (status, audit, `jobs approve` under scripts policy 'review')")
    return out


def privacy_risks(config: Config) -> list[str]:
    """What a site without `dp = "required"` accepts (docs/privacy.md), logged once at
    start-up so the choice is on record: one line, or none under required."""
    mode = config.privacy.dp
    if mode == "required":
        return []
    what = ("never adds noise" if mode == "off"
            else "adds noise only to queries that ask for an epsilon")
    return [f"{config.source}: [privacy].dp = {mode!r}: this site {what}; exact answers "
            "are guarded by k_min and exact auditing only, which is best effort (a refusal "
            "itself carries information, and totals of two or more subjects can be "
            "derived). Set dp = \"required\" for a formal (epsilon, delta) guarantee; see "
            "docs/privacy.md"]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere
