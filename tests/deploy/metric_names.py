"""Names of the gateway's Prometheus metrics, read from the live registry of service/metrics.py."""

from __future__ import annotations

from prometheus_client.metrics import MetricWrapperBase

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
            "summary": ("_sum", "_count")}


def gateway_metrics() -> dict[str, str]:
    """{family name: type} of every metric service/metrics.py defines."""
    import service.metrics

    out = {}
    for value in vars(service.metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                out[family.name] = family.type
    return out


def gateway_series() -> set[str]:
    """Every series name the gateway exports (counter _total, histogram _bucket/_sum/_count...)."""
    return {name + suffix for name, kind in gateway_metrics().items() for suffix in SUFFIXES[kind]}
