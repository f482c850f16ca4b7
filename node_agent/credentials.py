"""A bare agent's credentials for the control plane: the kubeconfig an admin wrote it, kept current.

A bare agent (the Mac) logs in with a ServiceAccount token bound to its Node. The token expires, and
nothing renews it as a kubelet renews a pod's: once it lapses the API server answers 401, the agent's
Lease stops being renewed, and the operator takes its stages away. So the agent

- reads when its token expires (the `exp` claim of the JWT: the API server checks the signature,
  the agent only reads the time) and says it: in its log at start, in its ComputeNode's condition
  `CredentialsExpiring` (False with the time; True once less than the warning time is left, so
  `kubectl get computenodes -o wide` and an alert can see it coming), and as a metric;
- reads its kubeconfig again when the file changes, so an admin refreshes a running agent by writing
  it a new kubeconfig (docs/runbook.md, section 3): no restart, no session lost;
- says plainly when the API server refuses the token (expired, or revoked by deleting its Node).
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
from pathlib import Path

log = logging.getLogger("node_agent.credentials")

WARN_BEFORE_S = 24 * 3600.0   # CredentialsExpiring turns True this long before the token lapses


def token_expiry(kubeconfig: str | os.PathLike) -> dt.datetime | None:
    """When the current context's bearer token expires, or None (no token, a client certificate,
    a token that is not a JWT or says no expiry)."""
    import yaml

    try:
        cfg = yaml.safe_load(Path(kubeconfig).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    ctx_name = cfg.get("current-context")
    ctx = next((c.get("context") or {} for c in cfg.get("contexts") or [] if c.get("name") == ctx_name), {})
    user = next((u.get("user") or {} for u in cfg.get("users") or [] if u.get("name") == ctx.get("user")), {})
    token = user.get("token")
    if not token and user.get("tokenFile"):
        try:
            token = Path(user["tokenFile"]).read_text().strip()
        except OSError:
            return None
    return jwt_expiry(token) if token else None


def jwt_expiry(token: str) -> dt.datetime | None:
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        return dt.datetime.fromtimestamp(int(claims["exp"]), dt.timezone.utc)
    except (ValueError, KeyError, TypeError):
        return None


class Kubeconfig:
    """The agent's kubeconfig file: loaded, watched for changes, and its token's expiry."""

    def __init__(self, path: str | os.PathLike, warn_before_s: float = WARN_BEFORE_S):
        self.path = Path(path)
        self.warn_before_s = warn_before_s
        self._stamp = self._file_stamp()
        self.expires = token_expiry(self.path)

    def _file_stamp(self):
        try:
            st = self.path.stat()
            return st.st_mtime_ns, st.st_size, st.st_ino
        except OSError:
            return None

    def reload_if_changed(self) -> bool:
        """Load the file again if it changed since it was last loaded; True when it did. A file half
        written (unreadable as a kubeconfig) is tried again at the next call."""
        from consortium import kube

        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        try:
            kube.load_config(str(self.path))
        except Exception as e:  # noqa: BLE001 - the config loader raises several kinds
            log.warning("kubeconfig %s changed but cannot be loaded yet: %s", self.path, e)
            return False
        self._stamp = stamp
        self.expires = token_expiry(self.path)
        log.info("kubeconfig %s changed: loaded again (%s)", self.path, self.describe())
        return True

    def seconds_left(self, now: dt.datetime | None = None) -> float | None:
        if self.expires is None:
            return None
        return (self.expires - (now or dt.datetime.now(dt.timezone.utc))).total_seconds()

    def expiring(self, now: dt.datetime | None = None) -> bool:
        left = self.seconds_left(now)
        return left is not None and left < self.warn_before_s

    def describe(self, now: dt.datetime | None = None) -> str:
        left = self.seconds_left(now)
        if left is None:
            return "its credentials name no expiry"
        when = self.expires.strftime("%Y-%m-%d %H:%M:%S UTC")
        if left <= 0:
            return f"its token expired at {when}"
        return f"its token expires at {when}, in {_span(left)}"

    def refused_hint(self) -> str:
        """What to tell when the API server refuses the token (401)."""
        left = self.seconds_left()
        why = "it has expired" if left is not None and left <= 0 else "it was revoked (its Node deleted?)"
        return (f"the API server refuses the agent's token: {why}; write the agent a new kubeconfig at "
                f"{self.path} (docs/runbook.md, section 3): it is loaded again when the file changes")


def _span(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min"


__all__ = ["Kubeconfig", "token_expiry", "jwt_expiry", "WARN_BEFORE_S"]
