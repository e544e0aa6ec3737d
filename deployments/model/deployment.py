"""The model deployment (Serve name ``VTPReplica``): one ``VTPReplica`` per Serve replica behind one dynamic batch
queue.

Every verb shares one ``@serve.batch`` queue, so a replica runs one model call at a time. A formed batch is split
into groups of the same verb and input shape (requests of different image sizes never share a model call), and
each request learns the size of the group it ran in. Inputs arrive already validated by the ingress; if a model
call fails anyway, only the requests of that group fail.

Batching is the deployment's ``user_config`` (``settings.Batching``: ``max_batch_size``, ``batch_wait_timeout_s``),
its one home: ``serve deploy`` with new values calls ``reconfigure`` on the running replicas, without reloading the
weights; keys a ``user_config`` leaves out keep the app's values. Placement is Serve's
``ray_actor_options``; the replica's device follows the accelerator Ray actually assigned to it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import ray
from ray import serve

from vtp_ray.placement import OPENMP_WAIT_VARS, assigned_device, brief_openmp_waits
from vtp_ray.text import expand
from vtp_ray.text.classifier import average_templates
from vtp_ray.text.tokenizer import available as text_available

from .. import metrics
from ..settings import Batching, merge_batching
from .batching import AdmissionGate
from .protocol import DEPLOYMENT_NAME, ClassScores, Outcome, Verb

if TYPE_CHECKING:
    from vtp_ray.replica import VTPReplica

log = logging.getLogger("ray.serve")

T = TypeVar("T")

_VISIBLE_DEVICE_VARS = ("ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")


@dataclass(frozen=True)
class _Job:
    verb: Verb
    array: np.ndarray | tuple[str, ...]  # the texts for embed_text
    enqueued: float

    def group(self) -> tuple[Verb, tuple[int, ...], str]:
        """Jobs of one group share a model call: same verb and input shape; all the texts of a batch."""
        if isinstance(self.array, tuple):
            return (self.verb, (), "text")
        return (self.verb, self.array.shape, self.array.dtype.str)


#: Prompts per text job of a classification (a label set x 80 templates is split into jobs of this many).
_PROMPTS_PER_JOB = 256


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=16, user_config=Batching().model_dump())
class ModelDeployment:
    """Loads one model on this actor's device and serves the verbs of ``VTPReplica`` through one batch queue.

    Args:
        model, precision: as ``VTPReplica``'s.
        device: ``None`` (the default) follows the accelerator Ray assigned; or an explicit ``VTPReplica`` device.
        warmup_size: side of the square image used to warm up.
        label_cache_size: label sets whose class embeddings ``classify`` keeps (least recently used goes first).
        batching: the app's batching; a ``user_config`` applies over it (``reconfigure``).
    """

    def __init__(
        self,
        model: str,
        precision: str = "fp32",
        device: str | None = None,
        warmup_size: int = 256,
        label_cache_size: int = 64,
        batching: Batching | None = None,
    ) -> None:
        device = device or assigned_device()
        brief_openmp_waits(device)
        # Every torch call of this replica, loading included, runs on this one thread. OpenMP keeps a thread team
        # per calling thread, and once the process has more team threads than cores, GNU OpenMP stops spinning at
        # barriers and puts them to sleep: a CPU model call from a second thread took 20-30% longer (~1,700 context
        # switches per batch-1 VTP-Small call).
        self._torch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vtp-model")
        self._replica = self._torch.submit(self._load, model, device, precision, warmup_size).result()
        self._label_cache: OrderedDict[tuple[tuple[str, ...], tuple[str, ...]], np.ndarray] = OrderedDict()
        self._label_cache_size = label_cache_size
        self._gate = AdmissionGate()
        self._base_batching = batching or Batching()
        self._batching = self._base_batching
        self._loaded_at = time.time()

    @staticmethod
    def _load(model: str, device: str, precision: str, warmup_size: int) -> VTPReplica:
        from vtp_ray.replica import VTPReplica  # here, not at import: the ingress imports this package too

        replica = VTPReplica(model, device=device, precision=precision, warmup_size=warmup_size)
        if warmup_size and replica.info.text_context_length and text_available():
            replica.embed_text(["warm-up"])  # loads the tokenizer before traffic
        return replica

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply a new ``user_config`` (batching; keys it leaves out keep the app's) to the running replica."""
        self._batching = merge_batching(self._base_batching, config)
        self._batch.set_max_batch_size(self._batching.max_batch_size)
        self._batch.set_batch_wait_timeout_s(self._batching.batch_wait_timeout_s)
        log.info("batching: %s", self._batching.model_dump())

    async def run(self, verb: Verb, array: np.ndarray) -> Outcome:
        """Run one request (an image (H, W, 3) or latents (C, h, w)) through the batch queue."""
        enqueued = time.perf_counter()
        async with self._gate.admitted():
            outcome = await self._batch(_Job(verb, array, enqueued))
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def run_many(self, verb: Verb, arrays: np.ndarray | list[np.ndarray]) -> list[Outcome]:
        """Run each of ``arrays`` (stacked inputs, or a list) as its own entry of the batch queue: a request of N
        inputs is N batch entries, so its model calls hold at most ``max_batch_size`` inputs, shared with others'."""
        return list(await asyncio.gather(*(self.run(verb, array) for array in arrays)))

    async def classify(self, image: np.ndarray, labels: tuple[str, ...], templates: tuple[str, ...] | str) -> Outcome:
        """Zero-shot scores of one image (H, W, 3) for ``labels`` put in ``templates`` (validated by the ingress),
        or in the named template set of ``vtp_ray.text.TEMPLATE_SETS``.

        The label set's class embeddings come from a bounded LRU cache, or from text jobs through the batch queue;
        the image goes through the queue as an ``embed`` job. The outcome's timings are the image's.
        """
        if isinstance(templates, str):
            from vtp_ray.text.imagenet import resolve_template_set  # open_clip: only where the model runs

            templates = resolve_template_set(templates)
        key = (labels, templates)
        classes = self._label_cache.get(key)
        hit = classes is not None
        if classes is None:
            prompts = expand(labels, templates)
            chunks = [tuple(prompts[i : i + _PROMPTS_PER_JOB]) for i in range(0, len(prompts), _PROMPTS_PER_JOB)]
            embedded = await asyncio.gather(*(self.run("embed_text", chunk) for chunk in chunks))
            classes = average_templates(np.concatenate([o.value for o in embedded]), len(templates))
            self._label_cache[key] = classes
            while len(self._label_cache) > self._label_cache_size:
                self._label_cache.popitem(last=False)
        self._label_cache.move_to_end(key)
        outcome = await self.run("embed", image)
        scores = await self._in_torch_thread(self._replica.zero_shot, outcome.value[None], classes)
        value = ClassScores(scores.logits[0], scores.probabilities[0], scores.activation, len(templates), hit)
        return Outcome(value, outcome.batch_size, outcome.queue_ms, outcome.model_ms)

    def info(self) -> dict[str, Any]:
        """The replica's model, device and batch settings, and which replica and devices this is."""
        import torch

        context = serve.get_replica_context()
        runtime = ray.get_runtime_context()
        return {
            **self._replica.info.to_dict(),
            "batching": self._batching.model_dump(),
            "replica": {
                "id": context.replica_id.unique_id,
                "actor_name": runtime.get_actor_name(),
                "node_id": runtime.get_node_id(),
                "loaded_at": self._loaded_at,
                "visible_devices": {var: os.environ[var] for var in _VISIBLE_DEVICE_VARS if var in os.environ},
                "accelerator_ids": {name: ids for name, ids in runtime.get_accelerator_ids().items() if ids},
                "cpu_threads": torch.get_num_threads(),
                "openmp_waits": {var: os.environ[var] for var in OPENMP_WAIT_VARS if var in os.environ},
            },
        }

    # The decorator's values are placeholders: reconfigure sets the configured ones.
    @serve.batch(max_batch_size=Batching().max_batch_size, batch_wait_timeout_s=Batching().batch_wait_timeout_s)
    async def _batch(self, jobs: list[_Job]) -> list[Outcome | Exception]:
        """Split a formed batch into same-verb, same-shape groups and make one model call per group."""
        self._gate.close()
        groups: dict[tuple[Verb, tuple[int, ...], str], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.group(), []).append(i)
        results: list[Outcome | Exception] = [RuntimeError("not run")] * len(jobs)
        for (verb, _, _), members in groups.items():
            started = time.perf_counter()
            for i in members:
                metrics.queue_wait_ms().observe((started - jobs[i].enqueued) * 1000, tags={"verb": verb})
            try:
                # Off the event loop: the replica keeps accepting requests (the next batch) meanwhile.
                values = await self._in_torch_thread(self._call, verb, [jobs[i].array for i in members])
            except Exception as e:
                log.exception("model call %s on %d inputs failed", verb, len(members))
                metrics.errors().inc(tags={"kind": "model"})
                error = RuntimeError(f"model call failed: {type(e).__name__}: {e}")
                for i in members:
                    results[i] = error
                continue
            model_ms = (time.perf_counter() - started) * 1000
            metrics.model_time_ms().observe(model_ms, tags={"verb": verb})
            metrics.batch_size().observe(len(members), tags={"verb": verb})
            for i, value in zip(members, values, strict=True):
                results[i] = Outcome(value, len(members), (started - jobs[i].enqueued) * 1000, model_ms)
        return results

    async def _in_torch_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._torch, fn, *args)

    def _call(self, verb: Verb, inputs: list[Any]) -> list[Any]:
        """One model call on the group's inputs (stacked arrays, or all their texts) -> one value per input."""
        if verb == "embed_text":
            out = self._replica.embed_text([text for texts in inputs for text in texts])
            ends = np.cumsum([len(texts) for texts in inputs])[:-1]
            return np.split(out, ends)
        out = getattr(self._replica, verb)(np.stack(inputs))
        return [out[i] for i in range(len(inputs))]
