"""Runs the gateway: one asyncio loop hosting the FastAPI app (uvicorn) and the grpc.aio server."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn
from grpc_health.v1 import health_pb2

from service.api.auth import load_keys
from service.api.grpc_server import SERVICE_NAME, create_server
from service.api.operations import Limits, Operations
from service.api.rest import create_app
from service.backends.base import Backend
from service.banks.store import open_store
from service.config import Settings

log = logging.getLogger("amserve")


def build_backend(settings: Settings) -> Backend:
    if settings.backend == "embedded":
        from service.backends.embedded import EmbeddedBackend

        return EmbeddedBackend(settings.data_dir, store=settings.store, model_repository=settings.model_repository,
                               device=settings.torch_device(),
                               max_batch_size=settings.max_batch_size,
                               max_queue_delay_us=settings.max_queue_delay_us,
                               max_queue_size=settings.max_queue_size, model=settings.model,
                               max_running_sequences=settings.max_running_sequences,
                               max_waiting_sequences=settings.max_waiting_sequences,
                               max_context=settings.max_context, dtype=settings.dtype, kv_dtype=settings.kv_dtype)
    if settings.backend == "triton":
        from service.backends.triton import TritonBackend
        from service.triton.launcher import TritonServer

        # With a shared store the gateway commits writes itself, and may read from several replicas.
        store = open_store(settings.store) if settings.store else None
        batching = dict(max_batch_size=settings.max_batch_size, max_queue_delay_us=settings.max_queue_delay_us,
                        max_queue_size=settings.max_queue_size)
        if settings.triton_url:  # e.g. the replicas of a Triton StatefulSet in Kubernetes, comma-separated
            return TritonBackend(settings.triton_url, store=store, **batching)
        # Otherwise run the bundled Triton as a child on free ports, serving this data dir.
        # The associative_memory model opens the same store (AMSERVE_STORE) and follows it as a replica.
        env = {"AMSERVE_STORE": settings.store} if settings.store else {}
        env |= {"AMSERVE_DTYPE": settings.dtype, "AMSERVE_KV_DTYPE": settings.kv_dtype}  # read by the llm model
        return TritonBackend(server=TritonServer(settings.model_repository, http_port=0, grpc_port=0,
                                                 metrics_port=0, data_dir=settings.data_dir, env=env), store=store,
                             **batching)
    raise SystemExit(f"unknown backend {settings.backend!r} (expected 'embedded' or 'triton')")


async def serve(settings: Settings, backend: Backend | None = None) -> None:
    api_keys = load_keys(settings.api_keys_file)
    if api_keys.open:
        log.warning("amserve: no API keys configured: the service is OPEN (no authentication, one bank namespace)")
    backend = backend or build_backend(settings)
    await backend.start()
    # One operations layer for both transports: they share its limits and its per-tenant stream count.
    ops = Operations(backend, Limits(max_vectors=settings.max_vectors_per_request, max_dim=settings.max_dim,
                                     max_new_tokens=settings.max_new_tokens,
                                     max_streams_per_tenant=settings.max_streams_per_tenant,
                                     max_prompt_chars=settings.max_prompt_chars,
                                     max_explain_states=settings.max_explain_states,
                                     max_attention_weights=settings.max_attention_weights))
    app = create_app(ops, max_body_bytes=settings.max_body_bytes, api_keys=api_keys,
                     protect_metrics=settings.protect_metrics, max_in_flight=settings.max_in_flight)
    rest = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.rest_port, log_level="warning",
                                         lifespan="off", timeout_graceful_shutdown=30))
    rest.install_signal_handlers = lambda: None  # this function owns SIGINT/SIGTERM for both transports
    grpc_server, health_servicer = create_server(ops, max_message_bytes=settings.max_body_bytes, api_keys=api_keys,
                                                 max_in_flight=settings.max_in_flight)
    grpc_server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
    await grpc_server.start()
    health_task = asyncio.create_task(_follow_readiness(backend, health_servicer))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    rest_task = asyncio.create_task(rest.serve())
    log.warning("amserve: REST on http://%s:%d, gRPC on %s:%d, backend %s", settings.host, settings.rest_port,
                settings.host, settings.grpc_port, backend.name)
    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait({rest_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    # Drain: refuse new work, let in-flight requests finish, then release the backend.
    await health_servicer.enter_graceful_shutdown()
    rest.should_exit = True
    await asyncio.gather(rest_task, grpc_server.stop(grace=30), return_exceptions=True)
    health_task.cancel()
    await backend.close()
    stop_task.cancel()


async def _follow_readiness(backend: Backend, health_servicer, period: float = 1.0) -> None:
    """grpc.health.v1 status mirrors the backend's readiness (e.g. Triton going away and coming back)."""
    while True:
        ready = await backend.ready()
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, status)
        await asyncio.sleep(period)
