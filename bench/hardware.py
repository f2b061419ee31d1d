"""Device facts for the benchmark: device and dtype choice, synchronised timing, the matmul rate,
and the live-memory growth of a scorer (bytes per mask)."""
from __future__ import annotations

import statistics
import time
import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True   # CPU bf16 matmuls run everywhere (fast with AVX512-BF16 / AMX)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[name]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of fn(), with the device drained before and after (GPU work is asynchronous)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def matmul_gflops(device: torch.device, dtype: torch.dtype, sizes=(1024, 2048), repeats: int = 3) -> float:
    """Best rate of square n x n matmuls over `sizes` (best of `repeats` each), GFLOP/s."""
    best = 0.0
    gen = torch.Generator(device="cpu").manual_seed(0)
    if device.type == "cuda":
        sizes = tuple(sizes) + (4096, 8192)         # a GPU needs bigger products to reach its peak
    for n in sizes:
        a = torch.randn(n, n, generator=gen).to(device, dtype)
        b = torch.randn(n, n, generator=gen).to(device, dtype)
        reps = 1 if device.type == "cpu" else 20            # GPU: enough work per timing to beat launch noise
        a @ b
        for _ in range(repeats):
            dt = timed(lambda: [a @ b for _ in range(reps)], device)
            best = max(best, reps * 2.0 * n ** 3 / dt / 1e9)
    return best


def median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


class LiveBytes(TorchDispatchMode):
    """Tracks bytes of tensor storages allocated by ops while active (views are not counted twice);
    `peak` is the largest live total. Device-independent, so it plans GPU memory from a CPU run."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = 0, 0
        self.refs: dict[int, list] = {}

    def _release(self, key: int) -> None:
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > 0:
                key = t.untyped_storage().data_ptr()
                entry = self.refs.get(key)
                if entry is None:
                    entry = self.refs[key] = [t.untyped_storage().nbytes(), 0]
                    self.live += entry[0]
                    self.peak = max(self.peak, self.live)
                entry[1] += 1
                weakref.finalize(t, self._release, key)
        return out


def peak_bytes(fn: Callable[[], object], device: torch.device = torch.device("cpu")) -> int:
    """Peak bytes allocated (and alive at once) while running fn(): the CUDA allocator's own peak on
    a GPU, else the storages that ops create (LiveBytes; allocator overhead not included)."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with LiveBytes() as tracker:
        fn()
    return tracker.peak
