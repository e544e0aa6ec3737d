"""Application metrics, exported through Ray Serve's metrics API (Prometheus on each node's metrics port).

Each metric is created on first use, inside the replica that records it, so that Serve tags it with the
deployment, replica and application. Names get Ray's ``ray_`` prefix on export.
"""

from __future__ import annotations

import functools

from ray.serve.metrics import Counter, Histogram

_MS_BOUNDARIES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
_BATCH_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128]


@functools.cache
def batch_size() -> Histogram:
    """Inputs per model call, by verb and priority (online requests, or batch work: jobs on the app)."""
    return Histogram(
        "vtp_batch_size",
        description="Requests per model call (one same-verb, same-shape group of a formed batch).",
        boundaries=_BATCH_BOUNDARIES,
        tag_keys=("verb", "priority"),
    )


@functools.cache
def queue_wait_ms() -> Histogram:
    """Per input: from entering the scheduler until its model call starts, by verb and priority."""
    return Histogram(
        "vtp_queue_wait_ms",
        description="Time a request waited in the model replica before its model call started (ms).",
        boundaries=_MS_BOUNDARIES,
        tag_keys=("verb", "priority"),
    )


@functools.cache
def model_time_ms() -> Histogram:
    """Wall time of one model call, by verb and priority."""
    return Histogram(
        "vtp_model_time_ms",
        description="Wall time of one model call on one batch group (ms).",
        boundaries=_MS_BOUNDARIES,
        tag_keys=("verb", "priority"),
    )


@functools.cache
def errors() -> Counter:
    """Failed requests by kind (``image_truncated``, ``too_large``, ``unauthorized``, ``model``, ...)."""
    return Counter(
        "vtp_errors",
        description="Failed requests by kind of error.",
        tag_keys=("kind",),
    )


@functools.cache
def requests() -> Counter:
    """Requests by caller (the API key's name, ``anonymous`` without one: never an address), kind of route (``model``,
    ``cheap``) and outcome (``admitted``, ``rate_limited``)."""
    return Counter(
        "vtp_requests",
        description="Requests by caller (API key name or anonymous), kind of route and rate-limit outcome.",
        tag_keys=("caller", "route", "outcome"),
    )
