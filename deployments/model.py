"""The model deployment: one ``VTPReplica`` per Ray actor behind one dynamic batch queue.

Every verb shares one ``@serve.batch`` queue, so a replica runs one model call at a time. A formed batch is
split into groups of the same verb and input shape (requests of different image sizes never share a model
call), and each request learns the size of the group it ran in. While model calls run, newcomers wait at an
admission gate and enter together afterwards, so that under load batches form full (see ``run``). Inputs
arrive already validated by the ingress; if a model call fails anyway, only the requests of that group fail.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import ray
import torch
from ray import serve

from vtp_ray.replica import VTPReplica

from . import metrics

log = logging.getLogger("ray.serve")

Verb = Literal["tokenize", "reconstruct", "decode", "embed"]
_VISIBLE_DEVICE_VARS = ("ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")


@dataclass(frozen=True)
class Outcome:
    """One request's result, the size of the model call it ran in, and where its time in this replica went."""

    value: Any
    batch_size: int
    queue_ms: float  # from arriving here until its model call started
    model_ms: float  # its model call


@dataclass(frozen=True)
class _Job:
    verb: Verb
    array: np.ndarray
    enqueued: float


@serve.deployment(name="VTPModel")
class VTPModelDeployment:
    """Loads one model on this actor's device and serves the batch verbs of ``VTPReplica``."""

    def __init__(
        self,
        model: str,
        device: str,
        precision: str,
        warmup_size: int,
        max_batch_size: int,
        batch_wait_timeout_s: float,
    ) -> None:
        self._replica = VTPReplica(model, device=device, precision=precision, warmup_size=warmup_size)
        self._batch.set_max_batch_size(max_batch_size)
        self._batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._batching = {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s}
        self._admitted = 0  # requests let into the batch queue and not finished yet
        self._admitting = asyncio.Event()
        self._admitting.set()

    async def run(self, verb: Verb, array: np.ndarray) -> Outcome:
        """Run one request (an image (H, W, 3) or latents (C, h, w)) through the batch queue."""
        enqueued = time.perf_counter()
        # @serve.batch forms the next batch while the previous one still runs, from whatever arrived within
        # batch_wait_timeout_s of its first request: under load, a string of small batches. So once a model call
        # has started, newcomers wait here until every request let in so far is done, then join the queue all at
        # once: the next batches form from everything that arrived meanwhile.
        await self._admitting.wait()
        self._admitted += 1
        try:
            outcome = await self._batch(_Job(verb, array, enqueued))
        finally:
            self._admitted -= 1
            if self._admitted == 0:
                self._admitting.set()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def info(self) -> dict[str, Any]:
        """The replica's model, device and batch settings, and which replica and devices this is."""
        context = serve.get_replica_context()
        runtime = ray.get_runtime_context()
        return {
            **self._replica.info,
            "batching": self._batching,
            "replica": {
                "id": context.replica_id.unique_id,
                "actor_name": runtime.get_actor_name(),
                "node_id": runtime.get_node_id(),
                "visible_devices": {var: os.environ[var] for var in _VISIBLE_DEVICE_VARS if var in os.environ},
                "accelerator_ids": {name: ids for name, ids in runtime.get_accelerator_ids().items() if ids},
                "cpu_threads": torch.get_num_threads(),
            },
        }

    # The decorator's values are placeholders: __init__ sets the configured ones.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _batch(self, jobs: list[_Job]) -> list[Outcome | Exception]:
        """Split a formed batch into same-verb, same-shape groups and make one model call per group."""
        self._admitting.clear()
        groups: dict[tuple[Verb, tuple[int, ...], str], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((job.verb, job.array.shape, job.array.dtype.str), []).append(i)
        results: list[Outcome | Exception] = [RuntimeError("not run")] * len(jobs)
        for (verb, _, _), members in groups.items():
            started = time.perf_counter()
            for i in members:
                metrics.queue_wait_ms().observe((started - jobs[i].enqueued) * 1000, tags={"verb": verb})
            try:
                # Off the event loop: the replica keeps accepting requests (the next batch) meanwhile.
                values = await asyncio.to_thread(self._call, verb, np.stack([jobs[i].array for i in members]))
            except Exception as e:
                log.exception(
                    "model call %s on %d inputs of shape %s failed", verb, len(members), jobs[members[0]].array.shape
                )
                metrics.errors().inc(tags={"kind": "model"})
                error = RuntimeError(f"model call failed: {type(e).__name__}: {e}")
                for i in members:
                    results[i] = error
                continue
            model_ms = (time.perf_counter() - started) * 1000
            metrics.model_time_ms().observe(model_ms, tags={"verb": verb})
            metrics.batch_size().observe(len(members), tags={"verb": verb})
            for i, value in zip(members, values, strict=True):
                queue_ms = (started - jobs[i].enqueued) * 1000
                results[i] = Outcome(value, len(members), queue_ms, model_ms)
        return results

    def _call(self, verb: Verb, batch: np.ndarray) -> list[Any]:
        """One model call on a stacked batch -> one value per input."""
        if verb == "tokenize":
            out = self._replica.tokenize(batch)
            clip = out.get("clip_embedding")
            return [(out["latents"][i], None if clip is None else clip[i]) for i in range(len(batch))]
        return list(getattr(self._replica, verb)(batch))
