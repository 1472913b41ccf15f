"""amserve-client: associative memories, the Energy Transformer and text generation of an amserve
service, over REST or gRPC, with numpy arrays in and out.

    from amserve_client import Client

    with Client("http://127.0.0.1:8000") as amserve:
        amserve.create_bank("faces", "modern", dim=4, params={"beta": 8.0})
        amserve.store("faces", [[1, 0, 0, 0], [0, 1, 0, 0]], ids=["alice", "bob"])
        [result] = amserve.retrieve("faces", [0.9, 0.2, 0, 0])
        result.nearest.id, result.state   # 'alice', array([0.9996, 0.0004, 0., 0.], dtype=float32)
"""

from amserve_client.client import AsyncClient, Client
from amserve_client.errors import (AmserveError, Conflict, InvalidArgument, NotFound, Overloaded, PayloadTooLarge,
                                   Timeout, Unauthorized, Unavailable)
from amserve_client.types import (Agreement, Alternative, Bank, Chunk, ExplainedStep, Fidelity, Generation,
                                  ImageCompletion, ImageFrame, MemoryResult, Model, Nearest, NextTokenCandidate,
                                  PromptToken, Shard, Stored, TextExplanation, TokenLogprob, TopMemory, Usage)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient", "Client",
    "AmserveError", "Conflict", "InvalidArgument", "NotFound", "Overloaded", "PayloadTooLarge", "Timeout",
    "Unauthorized", "Unavailable",
    "Alternative", "Bank", "Chunk", "Generation", "ImageCompletion", "MemoryResult", "Model", "Nearest", "Shard", "Stored",
    "TokenLogprob", "Usage",
    "Agreement", "ExplainedStep", "Fidelity", "ImageFrame", "NextTokenCandidate", "PromptToken", "TextExplanation",
    "TopMemory",
]
