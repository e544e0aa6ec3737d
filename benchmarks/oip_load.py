"""The Open Inference Protocol's cost next to the /v1 API and the replica called directly, measured in one run.

Starts a local Ray with the application, then, one client at a time, times ``embed`` of the same image by the
replica called directly (batch 1), ``POST /v1/embed`` (PNG body), and ``<model>.embed`` over the protocol with
tritonclient: over REST the PNG as ``IMAGE_BYTES`` (binary), the pixels as ``IMAGE`` UINT8 (binary) and as JSON
tensors; over gRPC (Serve's gRPC proxy) the PNG and the pixels. Then one infer request of ``--batch`` images next to
``--batch`` concurrent /v1 requests (throughput). Prints p50 latencies and the ratios to /v1.

    PYTHONPATH=. python benchmarks/oip_load.py                               # random:vtp-small, 256 px
    PYTHONPATH=. python benchmarks/oip_load.py --model tests/fixtures/vtp-tiny --size 64
"""

from __future__ import annotations

import argparse
import asyncio
import io
import socket
import statistics
import time
from collections.abc import Callable
from types import ModuleType

import httpx
import numpy as np
import ray
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
from _common import NO_RATE_LIMITS
from PIL import Image
from ray import serve

from deployments import AppSettings, compose_app
from deployments.oip.grpc_service import SERVICER_FUNCTION
from vtp_ray import VTPReplica
from vtp_ray.images import preprocess


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _p50_ms(call: Callable[[], object], repeats: int) -> float:
    call()  # warm
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _bytes_input(png: bytes, n: int, protocol: ModuleType = triton, **options: bool) -> triton.InferInput:
    """``n`` copies of the PNG as ``IMAGE_BYTES`` (``options``: REST's ``binary_data``)."""
    inp = protocol.InferInput("IMAGE_BYTES", [n], "BYTES")
    inp.set_data_from_numpy(np.array([png] * n, dtype=object), **options)
    return inp


def _pixels_input(pixels: np.ndarray, protocol: ModuleType = triton, **options: bool) -> triton.InferInput:
    """The pixels as ``IMAGE`` (``options``: REST's ``binary_data``)."""
    inp = protocol.InferInput("IMAGE", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels, **options)
    return inp


async def _concurrent_v1(base: str, png: bytes, n: int) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        answers = await asyncio.gather(
            *(client.post("/v1/embed", content=png, headers={"content-type": "image/png"}) for _ in range(n))
        )
    assert all(a.status_code == 200 for a in answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:vtp-small")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    png_buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(png_buffer, format="PNG")
    png = png_buffer.getvalue()
    pixels = preprocess(png, size=args.size)[None]

    replica = VTPReplica(args.model, device="cpu", warmup_size=0)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    port, grpc_port = _port(), _port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": port},
        grpc_options={"port": grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]},
    )
    app = AppSettings(
        model=args.model, image_size=args.size, max_batch_size=args.batch, placement="cpu", rate_limits=NO_RATE_LIMITS
    )
    serve.run(compose_app(app), name="vtp", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=base, timeout=600)
    client = triton.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=600)
    grpc_client = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")

    def v1() -> None:
        assert http.post("/v1/embed", content=png, headers={"content-type": "image/png"}).status_code == 200

    single = {
        "direct VTPReplica.embed (batch 1)": lambda: replica.embed(pixels),
        "/v1/embed (PNG body)": v1,
        "OIP IMAGE_BYTES binary": lambda: client.infer("vtp.embed", [_bytes_input(png, 1, binary_data=True)]),
        "OIP IMAGE uint8 binary": lambda: client.infer("vtp.embed", [_pixels_input(pixels, binary_data=True)]),
        "OIP IMAGE uint8 JSON": lambda: client.infer("vtp.embed", [_pixels_input(pixels, binary_data=False)]),
        "OIP gRPC IMAGE_BYTES": lambda: grpc_client.infer("vtp.embed", [_bytes_input(png, 1, triton_grpc)]),
        "OIP gRPC IMAGE uint8": lambda: grpc_client.infer("vtp.embed", [_pixels_input(pixels, triton_grpc)]),
    }
    results = {name: _p50_ms(call, args.repeats) for name, call in single.items()}
    batch_pixels = np.repeat(pixels, args.batch, axis=0)
    many = {
        f"{args.batch} concurrent /v1/embed": lambda: asyncio.run(_concurrent_v1(base, png, args.batch)),
        f"OIP one infer of {args.batch} IMAGE_BYTES": lambda: client.infer(
            "vtp.embed", [_bytes_input(png, args.batch, binary_data=True)]
        ),
        f"OIP one infer of {args.batch} IMAGE": lambda: client.infer(
            "vtp.embed", [_pixels_input(batch_pixels, binary_data=True)]
        ),
        f"OIP gRPC one infer of {args.batch} IMAGE": lambda: grpc_client.infer(
            "vtp.embed", [_pixels_input(batch_pixels, triton_grpc)]
        ),
    }
    results.update({name: _p50_ms(call, max(2, args.repeats // 3)) for name, call in many.items()})
    client.close()
    grpc_client.close()
    serve.shutdown()
    ray.shutdown()

    print(
        f"model {args.model}, {args.size} px, embed, p50 of {args.repeats} (batch rows: of {max(2, args.repeats // 3)})"
    )
    v1_ms, v1_batch = results["/v1/embed (PNG body)"], results[f"{args.batch} concurrent /v1/embed"]
    for name, ms in results.items():
        reference = v1_batch if name in many else v1_ms
        print(f"  {name:<40} {ms:9.1f} ms   x{ms / reference:5.2f} of /v1")


if __name__ == "__main__":
    main()
