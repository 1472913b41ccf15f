"""Service settings: defaults here, overridden by `amserve serve` flags or AMSERVE_* environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

LM_DTYPES = ("auto", "fp32", "bf16", "int8", "int4")  # LM weights (see service/engines/lm/weights.py)
KV_DTYPES = ("auto", "fp32", "bf16")                  # LM KV cache; auto = the activations' dtype


@dataclass
class Settings:
    host: str = "127.0.0.1"
    rest_port: int = 8000
    grpc_port: int = 8001
    backend: str = "triton"                 # "triton" | "embedded"
    triton_url: str | None = None           # host:port of a running Triton's gRPC endpoint
    data_dir: Path = Path("data")
    store: str | None = None                # postgresql://… to share banks between replicas (else SQLite in data_dir)
    model_repository: Path = Path("model_repository")
    device: str = "auto"                    # "auto" | "cpu" | "cuda"
    model: str = "default"                  # LM to serve: "default", a checkpoint dir / .gguf, or "none"
    max_running_sequences: int = 16         # continuous-batching slots of the LM
    max_waiting_sequences: int = 64         # generation queue before 429
    max_context: int = 2048                 # longest sequence per slot (the KV cache grows up to slots × context)
    dtype: str = "auto"                     # LM weights: one of LM_DTYPES
    kv_dtype: str = "auto"                  # LM KV cache: one of KV_DTYPES
    # Dynamic batching of retrieve/complete (embedded backend; the triton backend reads config.pbtxt).
    max_batch_size: int = 64
    max_queue_delay_us: int = 500
    max_queue_size: int = 1024
    max_in_flight: int = 512                # requests in progress per transport before 503 / RESOURCE_EXHAUSTED
    # Auth: API-key hashes per tenant (see service/api/auth.py); none configured = open service.
    api_keys_file: Path | None = None
    protect_metrics: bool = False           # require a key for /metrics too
    # Request limits.
    max_body_bytes: int = 64 * 1024 * 1024
    max_vectors_per_request: int = 10_000
    max_dim: int = 65_536
    max_new_tokens: int = 2048
    max_streams_per_tenant: int = 8
    max_prompt_chars: int = 32_768
    max_explain_states: int = 10_000        # explained retrieval: queries × (steps + 1) states per request
    max_attention_weights: int = 4_000_000  # /v1/explain: layers × heads × tokens² weights per request

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        """AMSERVE_<FIELD> environment variables, then explicit overrides (None means not given)."""
        values = {}
        for f in fields(cls):
            raw = os.environ.get(f"AMSERVE_{f.name.upper()}")
            if raw is not None:
                values[f.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        for f in fields(cls):  # coerce env strings to the field's type
            value = getattr(settings, f.name)
            if isinstance(value, str) and f.type in ("int", "Path", "Path | None", "bool"):
                coerce = {"int": int, "bool": lambda v: v.lower() in ("1", "true", "yes")}.get(f.type, Path)
                setattr(settings, f.name, coerce(value))
        for name, allowed in (("dtype", LM_DTYPES), ("kv_dtype", KV_DTYPES)):
            if getattr(settings, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {getattr(settings, name)!r}")
        settings.data_dir = Path(settings.data_dir)
        settings.model_repository = Path(settings.model_repository)
        return settings

    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
