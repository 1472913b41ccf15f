"""amserve: associative memories, the Energy Transformer and decoder LMs over REST and gRPC."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import sys
from pathlib import Path

from service import __version__
from service.config import KV_DTYPES, LM_DTYPES, Settings
from service.errors import ServiceError


def _serve(args: argparse.Namespace) -> int:
    import uvloop

    from service.server import serve

    settings = Settings.from_env(
        host=args.host, rest_port=args.rest_port, grpc_port=args.grpc_port, backend=args.backend,
        triton_url=args.triton_url, data_dir=args.data_dir, store=args.store, model_repository=args.model_repository,
        device=args.device, max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
        max_queue_size=args.max_queue_size, max_body_bytes=args.max_body_bytes,
        max_vectors_per_request=args.max_vectors_per_request, model=args.model,
        max_running_sequences=args.max_running_sequences, max_waiting_sequences=args.max_waiting_sequences,
        max_context=args.max_context, dtype=args.dtype, kv_dtype=args.kv_dtype, api_keys_file=args.api_keys_file,
        protect_metrics=args.protect_metrics or None, max_dim=args.max_dim, max_new_tokens=args.max_new_tokens,
        max_streams_per_tenant=args.max_streams_per_tenant, max_in_flight=args.max_in_flight,
        max_prompt_chars=args.max_prompt_chars, max_explain_states=args.max_explain_states,
        max_attention_weights=args.max_attention_weights)
    # uvloop: the event loop carries every REST and gRPC request, and uvloop's costs less per request.
    uvloop.run(serve(settings))
    return 0


def _add_serve(commands) -> None:
    p = commands.add_parser("serve", help="run the REST + gRPC gateway")
    p.add_argument("--backend", choices=["triton", "embedded"], help="where models run (default: triton)")
    p.add_argument("--triton-url", help="gRPC host:port of a running Triton (default: start one)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--rest-port", type=int, help="REST port (default 8000)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (default 8001)")
    p.add_argument("--data-dir", type=Path, help="where banks are persisted (default ./data)")
    p.add_argument("--store", help="postgresql://user@host:port/db: banks in a PostgreSQL shared by several "
                                   "replicas instead of SQLite in the data dir (also AMSERVE_STORE)")
    p.add_argument("--model-repository", type=Path, help="Triton model repository (default ./model_repository)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="engine device (default auto)")
    p.add_argument("--max-batch-size", type=int, help="query rows per batched engine call (default 64)")
    p.add_argument("--max-queue-delay-us", type=int, help="how long a request waits for company (default 500)")
    p.add_argument("--max-queue-size", type=int, help="waiting requests before 503 (default 1024)")
    p.add_argument("--max-in-flight", type=int, help="requests in progress per transport before 503 (default 512)")
    p.add_argument("--max-body-bytes", type=int, help="largest request body (default 64 MiB)")
    p.add_argument("--max-vectors-per-request", type=int, help="vectors per store/retrieve (default 10000)")
    p.add_argument("--max-dim", type=int, help="largest bank dimension (default 65536)")
    p.add_argument("--max-new-tokens", type=int, help="largest max_tokens of a generation (default 2048)")
    p.add_argument("--max-streams-per-tenant", type=int, help="generations in progress per caller (default 8)")
    p.add_argument("--max-prompt-chars", type=int, help="longest prompt in characters, checked before tokenising "
                                                         "(default 32768)")
    p.add_argument("--max-explain-states", type=int, help='states an explained retrieve lists: queries × (steps + 1) '
                                                           "(default 10000)")
    p.add_argument("--max-attention-weights", type=int, help="attention weights one /v1/explain answers: layers × "
                                                              "heads × tokens² (default 4000000)")
    p.add_argument("--model", help='LM to serve: "default" (SmolLM2-135M-Instruct), a GPT-2/Llama checkpoint '
                                   'directory or .gguf file, or "none"')
    p.add_argument("--max-running-sequences", type=int, help="LM decode slots (default 16)")
    p.add_argument("--max-waiting-sequences", type=int, help="LM requests waiting before 429 (default 64)")
    p.add_argument("--max-context", type=int, help="LM context per slot in tokens (default 2048)")
    p.add_argument("--dtype", choices=LM_DTYPES, help="LM weights: fp32, bf16, weight-only int8 / int4, or auto "
                   "(on CPU int4 for a checkpoint of 4-bit GGUF blocks such as the default model, else "
                   "fp32; bf16 on GPU; default auto)")
    p.add_argument("--kv-dtype", choices=KV_DTYPES, help="LM KV cache: fp32, bf16 or auto (the activations' dtype; "
                   "default auto)")
    p.add_argument("--api-keys-file", type=Path, help="JSON file of API-key hashes per tenant (amserve keys create)")
    p.add_argument("--protect-metrics", action="store_true", help="require an API key for /metrics")
    p.set_defaults(func=_serve)


def _create_key(args: argparse.Namespace) -> int:
    from service.api.auth import create_key

    print(create_key(args.file, args.tenant))
    return 0


def _add_keys(commands) -> None:
    p = commands.add_parser("keys", help="manage API keys")
    sub = p.add_subparsers(dest="keys_command", required=True)
    create = sub.add_parser("create", help="mint a key for a tenant; prints it once, stores only its hash")
    create.add_argument("--tenant", required=True)
    create.add_argument("--file", type=Path, required=True, help="the keys file (created if missing)")
    create.set_defaults(func=_create_key)


def _delegate(module: str, path: list[str], commands, help: str, argv: list[str]):
    """A subcommand whose flags and body live in `module`; it is imported only when `argv` names this
    command, so `amserve --help` and `amserve serve` do not pay for importing it."""
    p = commands.add_parser(path[-1], help=help)
    words = [a for a in argv if not a.startswith("-")]
    if words[:len(path)] == path:
        import importlib

        target = importlib.import_module(module)
        target.add_arguments(p)
        p.set_defaults(func=target.run)
    return p


# glibc's malloc serves blocks above its mmap threshold (128 KiB at first) from fresh pages, and gives
# freed heap above its trim threshold back: an engine call's temporaries (a batch × bank matrix is
# megabytes) then page-fault in anew on every call.
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 128 << 20
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)


# OpenMP's workers spin briefly after a parallel region, then sleep. The gaps between one engine
# call's regions are microseconds, so they are caught spinning; between calls the loop (and Triton's
# model processes) get the cores back at once. libgomp's default spins for milliseconds, on the cores
# the event loop needs; sleeping at once (PASSIVE) costs a wake-up at every region: on a 10k-pattern
# bank under wrk the short spin served 12 % more requests than PASSIVE (at 16 patterns, where the
# loop alone is the limit, 17 % fewer).
OPENMP_WAIT = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "3000"}


def set_openmp_wait() -> None:
    """OPENMP_WAIT, unless set already; before torch loads (libgomp reads them once)."""
    for name, value in OPENMP_WAIT.items():
        os.environ.setdefault(name, value)


def tune_process() -> None:
    """Settings that must precede torch's first allocations, here and in the processes this one starts
    (Triton and its model processes inherit the environment)."""
    set_openmp_wait()
    os.environ.setdefault("GLIBC_TUNABLES", f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD}:"
                                            f"glibc.malloc.trim_threshold={TRIM_THRESHOLD}")
    try:  # this process started before the variable was set
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError):  # not glibc
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    tune_process()
    parser = argparse.ArgumentParser(prog="amserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"amserve {__version__}")
    parser.add_argument("--log-level", default="WARNING")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(commands)
    _add_keys(commands)
    _delegate("service.triton.export", ["export"], commands, argv=argv,
              help="write the Triton model repository (and convert the default LM to safetensors)")
    _delegate("service.triton.launcher", ["triton"], commands, argv=argv, help="run the bundled Triton server alone")
    _delegate("service.engines.lm.kernels", ["kernels"], commands, argv=argv,
              help="compile the LM's fused CPU decode kernels for this machine (else done at first use)")
    train = commands.add_parser("train", help="train a model shipped with the service")
    models = train.add_subparsers(dest="model", required=True, metavar="MODEL")
    _delegate("service.training.energy_transformer", ["train", "energy-transformer"], models, argv=argv,
              help="Energy Transformer on the scikit-learn digits (masked-patch completion)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ServiceError as exc:
        parser.exit(2, f"amserve: error: {exc.message}\n")


if __name__ == "__main__":
    sys.exit(main())
