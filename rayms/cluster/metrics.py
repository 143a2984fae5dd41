"""Prometheus metrics, through Ray's metrics API so they appear on Ray's metrics endpoint.

Ray prefixes every name with ``ray_``. Counters and histograms are created once per process and tagged
with the model name, so a dashboard can break requests, latency and loads down by model.
"""

from __future__ import annotations

from ray.util import metrics

_LATENCY_BOUNDARIES_S = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
_LOAD_BOUNDARIES_S = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


class Metrics:
    """The replica's and agent's metrics; cheap to call on the request path."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "rayms_model_requests", description="Inference requests served, per model.", tag_keys=("model",))
        self.latency = metrics.Histogram(
            "rayms_model_latency_seconds", description="Model predict time, per model.",
            boundaries=_LATENCY_BOUNDARIES_S, tag_keys=("model",))
        self.loads = metrics.Counter(
            "rayms_model_loads", description="Model loads on replicas, by outcome.", tag_keys=("model", "outcome"))
        self.load_seconds = metrics.Histogram(
            "rayms_model_load_seconds", description="Time to fetch and load a model on a replica.",
            boundaries=_LOAD_BOUNDARIES_S, tag_keys=("model",))
        self.evictions = metrics.Counter(
            "rayms_model_evictions", description="Models evicted from replica memory (LRU).")
        self.download_bytes = metrics.Counter(
            "rayms_download_bytes", description="Artifact bytes downloaded, per model.", tag_keys=("model",))
        self.download_seconds = metrics.Histogram(
            "rayms_download_seconds", description="Artifact download time, per model.",
            boundaries=_LOAD_BOUNDARIES_S, tag_keys=("model",))
        self.download_failures = metrics.Counter(
            "rayms_download_failures", description="Artifact downloads that failed, per model.", tag_keys=("model",))

    def observe_request(self, model: str, seconds: float) -> None:
        tags = {"model": model}
        self.requests.inc(1, tags=tags)
        self.latency.observe(seconds, tags=tags)

    def count_load(self, model: str, *, ok: bool, seconds: float | None = None) -> None:
        self.loads.inc(1, tags={"model": model, "outcome": "ok" if ok else "failed"})
        if seconds is not None:
            self.load_seconds.observe(seconds, tags={"model": model})

    def count_evictions(self, count: int) -> None:
        self.evictions.inc(count)

    def record_download(self, model: str, event: str, detail: dict) -> None:
        """Hook for the agent's ``on_event`` callback."""
        tags = {"model": model}
        if event == "downloaded" and not detail.get("cached"):
            self.download_bytes.inc(int(detail.get("bytes") or 0), tags=tags)
            self.download_seconds.observe(float(detail.get("seconds") or 0.0), tags=tags)
        elif event == "failed":
            self.download_failures.inc(1, tags=tags)
