"""API keys: `Authorization: Bearer <key>` (REST) or `authorization` metadata (gRPC) → tenant.

Keys are kept only as SHA-256 hashes, in a JSON file (`--api-keys-file`) or the `AMSERVE_API_KEYS`
environment variable, both of the form {"keys": [{"tenant": "acme", "sha256": "<hex>"}]}; `amserve keys
create` mints a key and prints it once. With no keys configured the service runs open (one shared
namespace) and says so at start-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from service.errors import InvalidArgument, Unauthenticated

TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
KEY_PREFIX = "ams_"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKeys:
    tenant_of_hash: dict[str, str]

    @property
    def open(self) -> bool:
        return not self.tenant_of_hash

    def tenant(self, authorization: str | None) -> str | None:
        """The caller's tenant; None when the service runs open. Raises Unauthenticated."""
        if self.open:
            return None
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
        tenant = self.tenant_of_hash.get(key_hash(key.strip()))
        if tenant is None:
            raise Unauthenticated("invalid API key")
        return tenant


def parse_keys(text: str, source: str) -> dict[str, str]:
    try:
        entries = json.loads(text)["keys"]
        table = {}
        for entry in entries:
            tenant, digest = entry["tenant"], entry["sha256"].lower()
            if not TENANT_NAME.fullmatch(tenant) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"bad entry for tenant {tenant!r}")
            table[digest] = tenant
        return table
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(f"{source}: expected {{\"keys\": [{{\"tenant\", \"sha256\"}}]}}: {exc}") from exc


def load_keys(path: Path | None = None, env: str | None = None) -> ApiKeys:
    env = os.environ.get("AMSERVE_API_KEYS") if env is None else env
    table: dict[str, str] = {}
    if path is not None:
        table |= parse_keys(Path(path).read_text(), str(path))
    if env:
        table |= parse_keys(env, "AMSERVE_API_KEYS")
    return ApiKeys(table)


def create_key(path: Path, tenant: str) -> str:
    """Mint a key for `tenant`, add its hash to the keys file, return the key (shown once)."""
    if not TENANT_NAME.fullmatch(tenant):
        raise InvalidArgument(f"tenant must match {TENANT_NAME.pattern}", field="tenant")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    keys = json.loads(path.read_text())["keys"] if path.exists() else []
    keys.append({"tenant": tenant, "sha256": key_hash(key)})
    path.write_text(json.dumps({"keys": keys}, indent=2) + "\n")
    os.chmod(path, 0o600)
    return key
