"""Compiled replicas: the image verbs through ``torch.compile``, with bounded shapes, never compiling on the caller.

A replica's image verbs reduce to two graphs, shared by every verb: the **encoder** (normalized images -> latents
and the CLIP embedding; ``encode``, ``embed`` and the first half of ``reconstruct``) and the **decoder** (latents ->
normalized images). Each is compiled per input shape, and the shapes are bounded by design:

- **Batch sizes**: one graph for batch 1 and one with a dynamic batch dimension for 2 .. ``max_batch`` (dynamo
  specializes size 1 even when a dimension is marked dynamic); larger batches run in chunks of ``max_batch``.
  Measured on VTP-Small bf16 (2 vCPU AMD EPYC, AVX512-BF16), encoder ms/image, static graph per bucket 1/2/4/8 with
  padding against the dynamic graph: batch 2: 29.9 / 30.5, 4: 28.0 / 29.3, 8: 31.3 / 31.6 (equal within noise),
  but 3: 39.1 / 28.7 and 5: 47.4 / 33.0 (padding to 4 and 8 wastes up to 45%); half the graphs to compile and
  cache. The dynamic graph compiled cold in 203 s against 14-73 s per static one (the cache makes it a one-off).
- **Image sizes**: each spatial size is its own pair of graphs, compiled on first use, up to ``max_graphs``
  graphs per replica; shapes past the cap stay eager (logged once, counted).

**No call waits for a compile.** A call whose shape has no compiled graph yet runs eagerly (counted) and queues the
compile; a worker thread compiles off the calling path and exits when its queue is empty. Calls use dynamo's
run-only mode (``torch._dynamo.run``: cached graphs only, never a compile, thread-local), and a counter in the
backend tells whether the graph really ran; a compile on any other thread than the worker is counted as a defect.
The worker exits when idle because OpenMP keeps a thread team per calling thread: the Serve replica runs all its
torch calls on one thread for that reason (``deployments/replica.py``), and a second team only lives while a
compile runs.

**The compile cache** is inductor's own (``TORCHINDUCTOR_CACHE_DIR``: FX graph and AOTAutograd caches, kernels),
put under ``compile_cache`` (or env ``VTP_COMPILE_CACHE``) in a directory named for this machine class
(``compile_plan.cache_key``: torch version, Python, CPU capability or accelerator name), so a cache made on another
CPU class or torch version is never read. A second process with a filled cache compiles from it in seconds.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import types
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .compile_plan import CompilePlan, torchair
from .outputs import CompileStatus

log = logging.getLogger(__name__)

__all__ = ["MAX_GRAPHS", "CompiledModel", "GraphKey", "eager_status", "eager_units"]

#: Default graphs per replica: the default size's four (encoder and decoder, batch 1 and 2..max) and two more sizes.
MAX_GRAPHS = 12


# ------------------------------------------------------------------------------------ the two graphs


def _encoder(model, image: Tensor) -> tuple[Tensor, Tensor | None]:
    """Normalized images (N, 3, H, W) -> latents (N, C, h, w) and the normalized CLIP embedding (or None)."""
    tokens = model.trunk(image)
    latents = model._latents(tokens, image)
    clip = F.normalize(model._clip_head(tokens), dim=-1) if model.visual_proj is not None else None
    return latents, clip


def _decoder(model, latents: Tensor) -> Tensor:
    """Latents (N, C, h, w) -> normalized images (N, 3, 16h, 16w)."""
    return model.get_latents_decoded_images(latents)


def eager_units(model) -> dict[str, Callable]:
    """The two graphs as plain calls, for replicas that do not compile."""
    return {"encoder": functools.partial(_encoder, model), "decoder": functools.partial(_decoder, model)}


def _own_function(fn: Callable, name: str) -> Callable:
    """``fn`` with a code object of its own: dynamo keeps compiled graphs (and counts its recompile limit) per code
    object, so each replica gets its own, freed with it."""
    return types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name)


# ------------------------------------------------------------------------------------ the runtime


@dataclass(frozen=True)
class GraphKey:
    unit: str  # encoder | decoder
    batch: str  # "1", or "2-8" for the dynamic batch dimension
    shape: tuple[int, ...]  # the input's shape without the batch

    def __str__(self) -> str:
        return f"{self.unit} {self.batch}x{'x'.join(map(str, self.shape))}"


_PENDING, _READY, _FAILED = "pending", "ready", "failed"


class _Backend:
    """The compile backend, instrumented: which thread compiled, and whether a call ran a compiled graph."""

    def __init__(self, plan: CompilePlan, device_type: str, cpu_threads: int) -> None:
        self.plan = plan
        self.ran = threading.local()  # .n: compiled graphs run by this thread
        # .worker: this thread is a compile worker. A flag, not the worker's ident: each worker thread exits when
        # its queue is empty, and the next one may get another ident.
        self.thread = threading.local()
        self.compiles_on_calling_path = 0
        if plan.backend == "torchair":
            config = torchair().CompilerConfig()
            self._inner = torchair().get_npu_backend(compiler_config=config)
        else:
            from torch._inductor.compile_fx import compile_fx

            # No CUDA graphs on CUDA (mode="reduce-overhead"): inductor's CUDA graph trees belong to the thread
            # that imported them, and every call overwrites the previous call's outputs. Measured on an H200:
            # graphs recorded by the compile thread failed in the calling thread, and a reconstruction read its
            # encoder's outputs after the decoder had overwritten them.
            patches: dict[str, object] = {}
            if device_type == "cpu":
                # Kernels take their OpenMP team size from the compiling thread unless told: the caller's.
                patches["cpp.threads"] = cpu_threads
                # One C++ file per graph (wrapper and kernels) instead of one per kernel: the tiny model's first two
                # graphs compiled in 43 s instead of 121 s (2 vCPU), and VTP-Small runs as fast or faster.
                patches["cpp_wrapper"] = True
            self._inner = functools.partial(compile_fx, config_patches=patches)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        if not getattr(self.thread, "worker", False):
            self.compiles_on_calling_path += 1
        compiled = self._inner(gm, example_inputs)
        ran = self.ran

        def run(*args: object) -> object:
            ran.n = getattr(ran, "n", 0) + 1
            return compiled(*args)

        if getattr(compiled, "_boxed_call", False):  # dynamo then calls it with one list: passed on as it is
            run._boxed_call = True  # type: ignore[attr-defined]
        return run

    def runs(self) -> int:
        return getattr(self.ran, "n", 0)


class CompiledModel:
    """The encoder and decoder graphs of one model, compiled per shape off the calling path.

    Call ``encoder`` / ``decoder`` from any one thread (the replica's torch thread) under ``torch.inference_mode``;
    ``warm(size)`` queues the default size's graphs, ``ready`` / ``wait_ready`` say when they are compiled.
    """

    def __init__(
        self,
        model,
        device: torch.device,
        plan: CompilePlan,
        max_batch: int = 8,
        max_graphs: int = MAX_GRAPHS,
        cache_dir: Path | None = None,
        recompile_limit: int | None = None,
    ) -> None:
        if not plan.enabled:
            raise ValueError(f"compiling is not enabled: {plan.reason}")
        if max_batch < 1 or max_graphs < 1:
            raise ValueError(f"max_batch and max_graphs must be >= 1, got {max_batch} and {max_graphs}")
        self.model = model
        self.device = device
        self.plan = plan
        self.max_batch = max_batch
        self.max_graphs = max_graphs
        self.cache_dir = cache_dir
        self._latent_channels = model.config.vision_feature_bottleneck
        self._backend = _Backend(plan, device.type, torch.get_num_threads())
        # Dynamo compiles a function at most recompile_limit times, then runs it eagerly with only a warning (with
        # fullgraph=True: an error, reported as the graph's failure). Each replica has its own functions, so its
        # cap fits; the compile thread applies it (torch >= 2.10 keeps config overrides per thread).
        self.recompile_limit = recompile_limit or max(max_graphs, getattr(torch._dynamo.config, _limit_name()))
        tag = f"{id(self):x}"
        self._eager = eager_units(model)
        compiled = {
            unit: torch.compile(
                _own_function(fn, f"vtp_{unit}_{tag}"), backend=self._backend, fullgraph=True, dynamic=False
            )
            for unit, fn in (("encoder", _encoder), ("decoder", _decoder))
        }
        self._compiled = compiled
        # Dynamo's run-only mode: cached graphs or plain eager, never a compile (the mode is per thread).
        self._run_only = {unit: torch._dynamo.run(fn) for unit, fn in compiled.items()}
        self._lock = threading.Condition()
        self._states: dict[GraphKey, str] = {}
        self._failures: dict[GraphKey, str] = {}
        self._queue: deque[GraphKey] = deque()
        self._warm: set[GraphKey] = set()
        self._worker: threading.Thread | None = None
        self._closed = False
        self._over_cap: set[GraphKey] = set()
        self._missed: set[GraphKey] = set()
        self._eager_calls: Counter[str] = Counter()
        self._compiled_calls = 0
        self._compile_seconds = 0.0
        self._cache_hits = self._cache_misses = 0

    # ------------------------------------------------------------------------------ calling path

    def encoder(self, image: Tensor) -> tuple[Tensor, Tensor | None]:
        """Normalized images (N, 3, H, W) -> (latents, CLIP embedding or None)."""
        return self._call("encoder", image)

    def decoder(self, latents: Tensor) -> Tensor:
        """Latents (N, C, h, w) -> normalized images (N, 3, 16h, 16w)."""
        return self._call("decoder", latents)

    def _call(self, unit: str, x: Tensor):
        if len(x) > self.max_batch:
            parts = [self._call_one(unit, chunk) for chunk in x.split(self.max_batch)]
            if isinstance(parts[0], tuple):
                return tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts, strict=True))
            return torch.cat(parts)
        return self._call_one(unit, x)

    def _call_one(self, unit: str, x: Tensor):
        # The graphs are compiled for contiguous inference tensors, as the replica makes them: dynamo's guards check
        # strides and dispatch keys (the encoder's latents are a strided view).
        x = x.contiguous() if x.is_inference() else x.clone(memory_format=torch.contiguous_format)
        key = self._key(unit, x)
        state = self._state_or_queue(key)
        if state != _READY:
            reason = {None: "over_cap", _PENDING: "compiling", _FAILED: "failed"}[state]
            with self._lock:
                self._eager_calls[reason] += 1
            return self._eager[unit](x)
        before = self._backend.runs()
        out = self._run_only[unit](self.model, x)
        ran = self._backend.runs() > before
        with self._lock:
            if ran:
                self._compiled_calls += 1
            else:  # a guard failed: dynamo ran the function eagerly
                self._eager_calls["guard_miss"] += 1
            first_miss = not ran and key not in self._missed
            if first_miss:
                self._missed.add(key)
        if first_miss:
            log.warning("compiled graph %s did not match a call (a guard failed): such calls run eagerly", key)
        return out

    def settled(self, unit: str, x: Tensor) -> str | None:
        """How calls of ``x``'s shape run from now on: ``compiled``, or ``eager`` for good (failed, past the cap);
        None before the shape's first call and while it compiles. Larger batches: per chunk."""
        key = self._key(unit, x[: self.max_batch])
        with self._lock:
            state = self._states.get(key)
            if state == _READY:
                return "compiled"
            return "eager" if state == _FAILED or key in self._over_cap else None

    def _key(self, unit: str, x: Tensor) -> GraphKey:
        n = len(x)
        batch = "1" if n == 1 or self.max_batch == 1 else f"2-{self.max_batch}"
        return GraphKey(unit, batch, tuple(x.shape[1:]))

    def _state_or_queue(self, key: GraphKey) -> str | None:
        """The key's state; a new key is queued (or refused past the cap): None means eager for good."""
        with self._lock:
            state = self._states.get(key)
            if state is not None or key in self._over_cap:
                return state
            if len(self._states) >= self.max_graphs:
                self._over_cap.add(key)
                log.warning(
                    "not compiling %s: this replica has its cap of %d compiled graphs (max_graphs); it runs eagerly",
                    key,
                    self.max_graphs,
                )
                return None
            self._enqueue(key)
            return _PENDING

    # ------------------------------------------------------------------------------ compiling

    def warm(self, size: int) -> list[GraphKey]:
        """Queue the graphs of square ``size`` images (both batch graphs of the encoder and the decoder)."""
        patch = self.model.config.vision_patch_size
        if size % patch:
            raise ValueError(f"warm-up size must be a multiple of {patch}, got {size}")
        grid = size // patch
        batches = ["1"] + ([f"2-{self.max_batch}"] if self.max_batch > 1 else [])
        keys = [
            GraphKey(unit, batch, shape)
            for batch in batches
            for unit, shape in (("encoder", (3, size, size)), ("decoder", (self._latent_channels, grid, grid)))
        ]
        with self._lock:
            for key in keys:
                self._warm.add(key)
                if key not in self._states and len(self._states) < self.max_graphs:
                    self._enqueue(key)
        return keys

    def _enqueue(self, key: GraphKey) -> None:  # under the lock
        self._states[key] = _PENDING
        self._queue.append(key)
        if self._worker is None and not self._closed:
            self._worker = threading.Thread(target=self._work, name="vtp-compile", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        self._backend.thread.worker = True
        while True:
            with self._lock:
                if not self._queue or self._closed:
                    self._worker = None  # exits: its OpenMP team goes with it
                    self._lock.notify_all()
                    return
                key = self._queue.popleft()
            started = time.perf_counter()
            hits = _cache_counts()
            error = self._compile(key)
            seconds = time.perf_counter() - started
            hit, miss = (after - before for after, before in zip(_cache_counts(), hits, strict=True))
            with self._lock:
                self._compile_seconds += seconds
                self._cache_hits += hit > 0 and not miss
                self._cache_misses += miss > 0
                if error is None:
                    self._states[key] = _READY
                    source = "from the cache" if hit and not miss else "cold" if miss else "no cache"
                    log.info("compiled %s in %.1fs (%s, %s)", key, seconds, self.plan.backend, source)
                else:
                    self._states[key] = _FAILED
                    self._failures[key] = error
                    log.warning("compiling %s failed after %.1fs, it runs eagerly: %s", key, seconds, error)
                self._lock.notify_all()

    def _compile(self, key: GraphKey) -> str | None:
        """Compile ``key``'s graph by calling it once on zeros shaped like the calls (``None``, or the error)."""
        n = 1 if key.batch == "1" else 2
        try:
            with torch._dynamo.config.patch(**{_limit_name(): self.recompile_limit}), torch.inference_mode():
                x = torch.zeros((n, *key.shape), dtype=torch.float32, device=self.device)
                if key.batch != "1" and self.max_batch > 2:
                    torch._dynamo.mark_dynamic(x, 0, min=2, max=self.max_batch)
                before = self._backend.runs()
                self._compiled[key.unit](self.model, x)
                if self._backend.runs() == before:
                    return (
                        "torch.compile ran it eagerly (past dynamo's recompile limit, or a graph break: see the "
                        "torch._dynamo warnings)"
                    )
        except Exception as e:  # the graph stays eager; the status says why
            # torch >= 2.6 raises FailOnRecompileLimitHit with fullgraph=True; older ones an error naming the limit
            if type(e).__name__ == "FailOnRecompileLimitHit" or "cache_size_limit" in str(e):
                return f"past dynamo's recompile limit ({self.recompile_limit} graphs of this function)"
            first_line = next(iter(str(e).strip().splitlines()), "")
            return f"{type(e).__name__}: {first_line}"
        return None

    @property
    def ready(self) -> bool:
        """Whether the warm-up graphs are done compiling (compiled, or failed and eager)."""
        with self._lock:
            return all(self._states.get(key) != _PENDING for key in self._warm)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until ``ready`` (or ``timeout`` seconds); returns ``ready``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while any(self._states.get(key) == _PENDING for key in self._warm):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(left)
            return True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or compiling (tests, benchmarks)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._worker is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(left)
            return True

    def close(self) -> None:
        """Compile nothing more (the graph being compiled finishes)."""
        with self._lock:
            self._closed = True

    # ------------------------------------------------------------------------------ reporting

    def status(self, mode: str) -> CompileStatus:
        with self._lock:
            by_state = {state: sorted(str(k) for k, s in self._states.items() if s == state) for state in _STATES}
            return CompileStatus(
                mode=mode,
                compiled=True,
                backend=self.plan.backend,
                reason=self.plan.reason,
                ready=all(self._states.get(key) != _PENDING for key in self._warm),
                graphs=tuple(by_state[_READY]),
                pending=tuple(by_state[_PENDING]),
                failed={str(k): v for k, v in sorted(self._failures.items(), key=lambda kv: str(kv[0]))},
                over_cap=tuple(sorted(str(k) for k in self._over_cap)),
                max_graphs=self.max_graphs,
                max_batch=self.max_batch,
                compiled_calls=self._compiled_calls,
                eager_calls=dict(self._eager_calls),
                compile_seconds=round(self._compile_seconds, 3),
                compiles_on_calling_path=self._backend.compiles_on_calling_path,
                cache_hits=self._cache_hits,
                cache_misses=self._cache_misses,
                cache_dir=None if self.cache_dir is None else str(self.cache_dir),
            )


_STATES = (_PENDING, _READY, _FAILED)


def _cache_counts() -> tuple[int, int]:
    """(hits, misses) of inductor's FX graph cache and AOTAutograd's cache so far in this process (dynamo's
    counters, process-wide: the one compile thread of a replica reads them around each compile)."""
    counters = torch._dynamo.utils.counters
    hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    return hits, counters["inductor"]["fxgraph_cache_miss"]


def eager_status(plan: CompilePlan) -> CompileStatus:
    """The status of a replica that does not compile (``plan.reason`` says why)."""
    return CompileStatus(mode=plan.mode, compiled=False, backend=None, reason=plan.reason, ready=True)


@functools.cache
def _limit_name() -> str:
    """Dynamo's per-function compile limit (``cache_size_limit`` before torch 2.6). Read when a replica compiles:
    touching ``torch._dynamo`` imports it, a second on a CPU, which eager replicas never need."""
    return "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
