"""The state-store keys of every limit and book, named here once.

Everything of one team lives under the team's hash tag (``{team}``), so one Lua script takes all of a
request's limits on one Redis Cluster node; the upstream limits of a provider share the provider's
tag (``{p:name}``) and are taken in a call of their own.
"""

from __future__ import annotations


def team(prefix: str, team_id: str) -> str:
    return f"{prefix}:{{{team_id}}}"


def model(scope: str, model_name: str) -> str:
    """A team's per-model limits (``teams[].model_limits``), or one upstream model of a provider."""
    return f"{scope}:m:{model_name}"


def api_key(scope: str, key_id: str) -> str:
    return f"{scope}:k:{key_id}"


def provider(prefix: str, name: str) -> str:
    return f"{prefix}:{{p:{name}}}"


def usage(prefix: str, team_id: str, day: str) -> str:
    """The per-day usage report of a team (read by ``GET /api/v1/usage``)."""
    return f"{team(prefix, team_id)}:usage:{day}"


def tickets(prefix: str, team_id: str) -> str:
    """The bucket of a team's native stream tickets."""
    return f"{team(prefix, team_id)}:tickets"


def usage_api(prefix: str, team_id: str | None) -> str:
    """The bucket of the usage API's callers: per team, or the admin callers of one instance."""
    return (
        f"{team(prefix, team_id)}:usage-api:rpm" if team_id is not None else f"{prefix}:usage-api:admin:rpm"
    )
