"""Prometheus metrics of the gateway (names in the style of vLLM/TGI). Documented in docs/metrics.md."""

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUEST_DURATION = Histogram(
    "amserve_request_duration_seconds", "Time from request received to response sent.",
    ["route", "transport", "model", "status"], buckets=LATENCY_BUCKETS)
REQUESTS = Counter(
    "amserve_requests_total", "Requests answered.", ["route", "transport", "status"])
REJECTIONS = Counter(
    "amserve_rejections_total", "Requests refused before reaching a model.", ["reason"])
IN_FLIGHT = Gauge(
    "amserve_requests_in_flight", "Requests being handled now.", ["transport"])
QUEUE_WAIT = Histogram(
    "amserve_queue_wait_seconds", "Time a request waited in the batching queue.", ["model"],
    buckets=LATENCY_BUCKETS)
QUEUE_DEPTH = Gauge(
    "amserve_queue_depth", "Requests waiting in the batching queue.", ["model"])
BATCH_SIZE = Histogram(
    "amserve_batch_size", "Requests merged into one engine call.", ["model"], buckets=BATCH_BUCKETS)
BATCH_ROWS = Histogram(
    "amserve_batch_rows", "Query vectors in one engine call.", ["model"], buckets=BATCH_BUCKETS)
# No label takes a bank or tenant name: both are unbounded, and /metrics is open by default. Bank sizes
# are in the API (GET /v1/banks).
RETRIEVE_STEPS = Histogram(
    "amserve_retrieve_steps", "Dynamics steps until convergence or the step limit.", ["model"],
    buckets=(1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000))
REPLICATION_LAG = Histogram(
    "amserve_replication_lag_seconds", "From a write's commit in the shared store to this replica serving it "
    "(writes this replica applies from the change log: other gateways', or its own when it fell behind).",
    buckets=LATENCY_BUCKETS)
TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
TIME_TO_FIRST_TOKEN = Histogram(
    "amserve_time_to_first_token_seconds", "From request to its first generated token.", ["model"],
    buckets=TOKEN_LATENCY_BUCKETS)
INTER_TOKEN_LATENCY = Histogram(
    "amserve_inter_token_latency_seconds", "Between consecutive generated tokens of one request.", ["model"],
    buckets=TOKEN_LATENCY_BUCKETS)
GENERATION_DURATION = Histogram(
    "amserve_e2e_generation_seconds", "From request to its last generated token.", ["model", "finish_reason"],
    buckets=LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("amserve_prompt_tokens_total", "Prompt tokens prefilled.", ["model"])
GENERATED_TOKENS = Counter("amserve_generation_tokens_total", "Tokens generated.", ["model"])
RUNNING_SEQUENCES = Gauge("amserve_running_sequences", "Sequences in the running decode batch.", ["model"])
WAITING_SEQUENCES = Gauge("amserve_waiting_sequences", "Sequences waiting for a decode slot.", ["model"])

MODEL_OF_ROUTE = {
    "/v1/complete": "energy_transformer", "CompleteImage": "energy_transformer",
    "/v1/generate": "llm", "/v1/completions": "llm", "/v1/chat/completions": "llm", "Generate": "llm", "Chat": "llm",
}
MEMORY_RPCS = {"CreateBank", "ListBanks", "GetBank", "DeleteBank", "Store", "DeletePattern", "Retrieve", "Complete",
               "BankFidelity"}


def model_of(route: str) -> str:
    """The `model` label of a REST route template or gRPC method."""
    if route in MODEL_OF_ROUTE:
        return MODEL_OF_ROUTE[route]
    return "associative_memory" if route.startswith("/v1/banks") or route in MEMORY_RPCS else "none"
