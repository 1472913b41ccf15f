"""Where a sharded bank's patterns live: shard by a stable hash of the pattern id, and each shard on
two replicas derived from the replica list alone, so that every gateway and replica agrees on the
placement without asking anyone.

    shard_of(id, S) = BLAKE2b-64(id) mod S          (the same on every machine and Python run)
    replicas_of(s, R) = {s mod R, (s + 1) mod R}    (one replica when R = 1)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from pydantic import BaseModel

from service.errors import InvalidArgument

# A Triton replica learns its place in the gateway's replica list from this variable ("index/count").
REPLICA_ENV = "AMSERVE_REPLICA"


def shard_of(pattern_id: str, shards: int) -> int:
    return int.from_bytes(hashlib.blake2b(pattern_id.encode(), digest_size=8).digest(), "little") % shards


def replicas_of(shard: int, replicas: int) -> list[int]:
    """The replicas (indices into the replica list) that serve `shard`, first choice first."""
    return sorted({shard % replicas, (shard + 1) % replicas}, key=lambda r: (r - shard) % replicas)


@dataclass(frozen=True)
class Placement:
    """This process's place among `count` replicas: it serves the shards placed on replica `index`."""

    index: int = 0
    count: int = 1

    def holds(self, shard: int) -> bool:
        return self.index in replicas_of(shard, self.count)

    @classmethod
    def from_env(cls) -> Placement:
        value = os.environ.get(REPLICA_ENV)
        if not value:
            return cls()
        try:
            index, count = (int(part) for part in value.split("/"))
        except ValueError:
            raise InvalidArgument(f"{REPLICA_ENV} must read index/count, got {value!r}") from None
        if not 0 <= index < count:
            raise InvalidArgument(f"{REPLICA_ENV}: index must be in [0, count), got {value!r}")
        return cls(index, count)


EVERY_SHARD = Placement()  # a process that serves every shard: embedded, or the one Triton


class ShardInfo(BaseModel):
    shard: int
    count: int  # patterns in the shard
    replicas: list[str]  # who serves it, first choice first
