"""The model deployment (Serve name ``VTPReplica``): one ``VTPReplica`` per Serve replica behind one scheduler.

Every input goes through the replica's ``BatchScheduler`` (``batching``): online requests (``run``, ``run_many``,
``classify``) first, the blocks of jobs that run on the app (``run_block``) only when no online request waits. A
model call holds one verb and input shape (requests of different image sizes never share one), and each input
learns the size of the call it ran in. Inputs arrive already validated (by the ingress, or by the job's preprocess
stage); if a model call fails anyway, only the inputs of that call fail.

Batching is the deployment's ``user_config`` (``settings.Batching``: ``max_batch_size``, ``batch_wait_timeout_s``,
``batch_min_share``, ``batch_work_size``), its one home: ``serve deploy`` with new values calls ``reconfigure`` on
the running replicas, without reloading the weights; keys a ``user_config`` leaves out keep the app's values.
Placement is Serve's ``ray_actor_options``; the replica's device follows the accelerator Ray actually assigned to it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import ray
from ray import serve

from vtp_ray.cpu_threads import CpuThreads
from vtp_ray.outputs import identity_differences
from vtp_ray.placement import OPENMP_WAIT_VARS, assigned_device, brief_openmp_waits
from vtp_ray.text import expand
from vtp_ray.text.classifier import average_templates
from vtp_ray.text.tokenizer import available as text_available

from .. import metrics
from ..settings import Batching, merge_batching
from .batching import BatchScheduler, Done, Priority
from .protocol import DEPLOYMENT_NAME, Block, ClassScores, ModelMismatch, Outcome, Verb, stacked

if TYPE_CHECKING:
    from vtp_ray.replica import VTPReplica

log = logging.getLogger("ray.serve")

T = TypeVar("T")

_VISIBLE_DEVICE_VARS = ("ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")

#: Prompts per text input of a classification (a label set x 80 templates is split into inputs of this many).
_PROMPTS_PER_INPUT = 256


def group_of(verb: Verb, value: np.ndarray | tuple[str, ...]) -> Hashable:
    """Inputs of one group share a model call: same verb and input shape; all the texts of ``embed_text``."""
    if isinstance(value, tuple):
        return (verb, (), "text")
    return (verb, value.shape, value.dtype.str)


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=16, user_config=Batching().model_dump())
class ModelDeployment:
    """Loads one model on this actor's device and serves the verbs of ``VTPReplica`` through one scheduler.

    Args:
        model, precision: as ``VTPReplica``'s.
        device: ``None`` (the default) follows the accelerator Ray assigned; or an explicit ``VTPReplica`` device.
        warmup_size: side of the square image used to warm up.
        label_cache_size: label sets whose class embeddings ``classify`` keeps (least recently used goes first).
        batching: the app's batching; a ``user_config`` applies over it (``reconfigure``).
        compile, compile_cache: as ``VTPReplica``'s. A compiling replica returns from its constructor (so Serve marks
            it RUNNING and routes to it) only once the graphs of ``warmup_size`` images at every batch up to its
            largest model call (``max_batch_size``, or ``batch_work_size`` if larger) are compiled: until then
            readiness says it is starting, and no request ever waits for a compile. Other shapes compile in the
            background and run eagerly meanwhile.
        cpu_threads, cuda_graphs: as ``VTPReplica``'s.
    """

    def __init__(
        self,
        model: str,
        precision: str = "fp32",
        device: str | None = None,
        warmup_size: int = 256,
        label_cache_size: int = 64,
        batching: Batching | None = None,
        compile: str = "off",
        compile_cache: str | None = None,
        cpu_threads: CpuThreads = "auto",
        cuda_graphs: bool = True,
    ) -> None:
        device = device or assigned_device()
        brief_openmp_waits(device)
        # Every torch call of this replica, loading included, runs on this one thread. OpenMP keeps a thread team
        # per calling thread, and once the process has more team threads than cores, GNU OpenMP stops spinning at
        # barriers and puts them to sleep: a CPU model call from a second thread took 20-30% longer (~1,700 context
        # switches per batch-1 VTP-Small call).
        self._torch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vtp-model")
        started = time.perf_counter()
        self._base_batching = batching or Batching()
        largest = self._base_batching.largest_call
        load = (model, device, precision, warmup_size, compile, compile_cache, largest, cpu_threads, cuda_graphs)
        self._replica = self._torch.submit(self._load, *load).result()
        if not self._replica.compile_ready:
            log.info("VTPReplica %s: compiling the graphs of %d px before serving", model, warmup_size)
            self._replica.wait_compiled()
        info = self._replica.info
        # Through Serve's logger: the replica's log file, and the `serve run` console (the line docs/serving.md names).
        log.info(
            "VTPReplica ready: %s on %s %s in %.1fs (%s)", info.model, info.device, info.precision,
            time.perf_counter() - started, info.compile.reason if info.compile else "eager",
        )  # fmt: skip
        self._identity = self._replica.info.identity()
        self._label_cache: OrderedDict[tuple[tuple[str, ...], tuple[str, ...]], np.ndarray] = OrderedDict()
        self._label_cache_size = label_cache_size
        self._scheduler = BatchScheduler(self._model_call, self._base_batching, on_call=_record)
        self._loaded_at = time.time()

    @staticmethod
    def _load(
        model: str, device: str, precision: str, warmup_size: int, compile: str, cache: str | None, max_batch: int,
        cpu_threads: CpuThreads, cuda_graphs: bool,
    ) -> VTPReplica:  # fmt: skip
        from vtp_ray.replica import VTPReplica  # here, not at import: the ingress imports this package too

        replica = VTPReplica(
            model, device=device, precision=precision, warmup_size=warmup_size, compile=compile,
            compile_cache=cache, compile_max_batch=max_batch, cpu_threads=cpu_threads, cuda_graphs=cuda_graphs,
        )  # fmt: skip
        if warmup_size and replica.info.text_context_length and text_available():
            replica.embed_text(["warm-up"])  # loads the tokenizer before traffic
        return replica

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply a new ``user_config`` (batching; keys it leaves out keep the app's) to the running replica."""
        batching = merge_batching(self._base_batching, config)
        self._scheduler.configure(batching)
        log.info("batching: %s", batching.model_dump())

    # --------------------------------------------------------------------------------- online requests

    async def run(self, verb: Verb, array: np.ndarray | tuple[str, ...]) -> Outcome:
        """One online request (an image (H, W, 3), latents (C, h, w), or a tuple of texts) through the scheduler."""
        return _outcome(await self._scheduler.submit(group_of(verb, array), (verb, array), "online"))

    async def run_many(self, verb: Verb, arrays: np.ndarray | list[np.ndarray]) -> list[Outcome]:
        """Each of ``arrays`` (stacked inputs, or a list) as its own online input: a request of N inputs is N
        inputs of the scheduler, so its model calls hold at most ``max_batch_size`` inputs, shared with others'."""
        return list(await asyncio.gather(*(self.run(verb, array) for array in arrays)))

    async def classify(self, image: np.ndarray, labels: tuple[str, ...], templates: tuple[str, ...] | str) -> Outcome:
        """Zero-shot scores of one image (H, W, 3) for ``labels`` put in ``templates`` (validated by the ingress),
        or in the named template set of ``vtp_ray.text.TEMPLATE_SETS``.

        The label set's class embeddings come from a bounded LRU cache, or from text inputs through the scheduler;
        the image goes through it as an ``embed`` input. The outcome's timings are the image's.
        """
        if isinstance(templates, str):
            from vtp_ray.text.imagenet import resolve_template_set  # open_clip: only where the model runs

            templates = resolve_template_set(templates)
        key = (labels, templates)
        classes = self._label_cache.get(key)
        hit = classes is not None
        if classes is None:
            classes = await self._class_embeddings(labels, templates, "online")
            self._label_cache[key] = classes
            while len(self._label_cache) > self._label_cache_size:
                self._label_cache.popitem(last=False)
        self._label_cache.move_to_end(key)
        outcome = await self.run("embed", image)
        scores = await self._in_torch_thread(self._replica.zero_shot, outcome.value[None], classes)
        value = ClassScores(scores.logits[0], scores.probabilities[0], scores.activation, len(templates), hit)
        return Outcome(value, outcome.batch_size, outcome.queue_ms, outcome.model_ms)

    # --------------------------------------------------------------------------------------- batch work

    async def run_block(
        self, verb: Verb, inputs: Sequence[np.ndarray | tuple[str, ...]], expected: Mapping[str, Any] | None = None
    ) -> Block:
        """A job's block at batch priority: each input one item of the scheduler's batch queue, in model calls of
        up to ``max_batch_size`` that run only while no online request waits. ``expected`` (the model identity the
        job asked for) must be what this replica serves, else ``ModelMismatch`` before anything runs: rows of two
        models never mix."""
        if expected is not None and identity_differences(expected, self._identity):
            raise ModelMismatch(expected, self._identity)
        done = await asyncio.gather(*(self._scheduler.submit(group_of(verb, x), (verb, x), "batch") for x in inputs))
        values = stacked(verb, [d.value for d in done])
        return Block(values, self._identity, serve.get_replica_context().replica_id.unique_id)

    async def zero_shot(self, image_embeddings: np.ndarray, class_embeddings: np.ndarray) -> Any:
        """``VTPReplica.zero_shot`` (a small matmul with the checkpoint's logit scale, outside the queue)."""
        return await self._in_torch_thread(self._replica.zero_shot, image_embeddings, class_embeddings)

    # ------------------------------------------------------------------------------------------- status

    def info(self) -> dict[str, Any]:
        """The replica's model, device and batch settings, which replica and devices this is, and how its model
        time was shared between online requests and batch work."""
        context = serve.get_replica_context()
        runtime = ray.get_runtime_context()
        totals = self._scheduler.totals
        model_s = sum(t.model_s for t in totals.values())
        return {
            **self._replica.info.to_dict(),
            "batching": self._scheduler.batching.model_dump(),
            "replica": {
                "id": context.replica_id.unique_id,
                "actor_name": runtime.get_actor_name(),
                "node_id": runtime.get_node_id(),
                "loaded_at": self._loaded_at,
                "visible_devices": {var: os.environ[var] for var in _VISIBLE_DEVICE_VARS if var in os.environ},
                "accelerator_ids": {name: ids for name, ids in runtime.get_accelerator_ids().items() if ids},
                "cpu_threads": self._replica.cpu_threads,
                "cpu_thread_timings_ms": {n: round(s * 1000, 3) for n, s in self._replica.cpu_thread_timings.items()},
                "openmp_waits": {var: os.environ[var] for var in OPENMP_WAIT_VARS if var in os.environ},
            },
            "work": {
                **{p: {"items": t.items, "calls": t.calls, "model_s": round(t.model_s, 3)} for p, t in totals.items()},
                "batch_calls_ahead_of_online": totals["batch"].ahead_of_online,
                "batch_share": round(totals["batch"].model_s / model_s, 4) if model_s else 0.0,
                "waiting": self._scheduler.waiting(),
            },
        }

    # ------------------------------------------------------------------------------------------ helpers

    async def _class_embeddings(
        self, labels: tuple[str, ...], templates: tuple[str, ...], priority: Priority
    ) -> np.ndarray:
        prompts = expand(labels, templates)
        chunks = [tuple(prompts[i : i + _PROMPTS_PER_INPUT]) for i in range(0, len(prompts), _PROMPTS_PER_INPUT)]
        group = group_of("embed_text", ())
        embedded = await asyncio.gather(*(self._scheduler.submit(group, ("embed_text", c), priority) for c in chunks))
        return average_templates(np.concatenate([d.value for d in embedded]), len(templates))

    async def _model_call(self, group: Hashable, payloads: list[tuple[Verb, Any]]) -> list[Any]:
        verb = payloads[0][0]
        try:
            return await self._in_torch_thread(self._call, verb, [value for _, value in payloads])
        except Exception as e:
            log.exception("model call %s on %d inputs failed", verb, len(payloads))
            metrics.errors().inc(tags={"kind": "model"})
            raise RuntimeError(f"model call failed: {type(e).__name__}: {e}") from e

    async def _in_torch_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._torch, fn, *args)

    def _call(self, verb: Verb, inputs: list[Any]) -> list[Any]:
        """One model call on a group's inputs (stacked arrays, or all their texts) -> one value per input."""
        if verb == "embed_text":
            out = self._replica.embed_text([text for texts in inputs for text in texts])
            ends = np.cumsum([len(texts) for texts in inputs])[:-1]
            return np.split(out, ends)
        out = getattr(self._replica, verb)(np.stack(inputs))
        return [out[i] for i in range(len(inputs))]


def _outcome(done: Done) -> Outcome:
    return Outcome(done.value, done.batch_size, done.queue_ms, done.model_ms)


def _record(group: Hashable, priority: Priority, items: int, model_s: float, waits_s: list[float]) -> None:
    """One model call in the Serve metrics, tagged with its verb and priority (online requests or batch work)."""
    tags = {"verb": str(group[0]), "priority": priority}  # type: ignore[index]
    metrics.model_time_ms().observe(model_s * 1000, tags=tags)
    metrics.batch_size().observe(items, tags=tags)
    for wait in waits_s:
        metrics.queue_wait_ms().observe(wait * 1000, tags=tags)
