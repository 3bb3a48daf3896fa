"""Device and precision choice, and the out-of-memory retry shared by every batched model call."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def pick_device(preferred: Optional[str] = None) -> torch.device:
    """cuda, then mps, then cpu; an explicit `preferred` wins, if this machine has it (else a ConfigError)."""
    if preferred:
        from aspire.errors import ConfigError

        try:
            device = torch.device(preferred)
        except RuntimeError:
            raise ConfigError(f"--device {preferred!r}: not a device name (cpu, cuda, cuda:1, mps)") from None
        if device.type == "cuda" and (not torch.cuda.is_available()
                                      or (device.index or 0) >= torch.cuda.device_count()):
            found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
            raise ConfigError(f"--device {preferred!r}: this machine has {found}; use --device cpu")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"--device {preferred!r}: this machine has no MPS device; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """`precision` ("float16", "bfloat16", "float32"); "auto": half precision on GPU, full precision on CPU."""
    if precision != "auto":
        return getattr(torch, precision)
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


def place_pipeline(pipe, device: torch.device, memory, what: str):
    """A diffusers pipeline on `device` with the memory switches of `memory` (config.DiffusionMemory)."""
    if memory.attention_slicing:
        pipe.enable_attention_slicing()
    if memory.vae_tiling:
        pipe.vae.enable_tiling()
    if not memory.cpu_offload:
        return pipe.to(device)
    if device.type != "cuda":
        from aspire.errors import ConfigError

        raise ConfigError(f"{what}.cpu_offload needs a CUDA device (this run's is {device}); turn it off")
    pipe.enable_model_cpu_offload(device=device)
    return pipe


def pixel_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a vision model's pixel values must have: that of its first convolution (the patch
    embedding). A transformers model's own `.dtype` can name a part kept in float32 in a half-precision
    model (BLIP-2's Q-Former, SAM's positional embedding)."""
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return conv.weight.dtype if conv is not None else next(model.parameters()).dtype


@contextlib.contextmanager
def deterministic_cudnn() -> Iterator[None]:
    """cuDNN's deterministic kernels for the block (seeded training gives the same weights on a GPU too);
    the previous flags are restored after it."""
    backend = torch.backends.cudnn
    saved = (backend.deterministic, backend.benchmark)
    backend.deterministic, backend.benchmark = True, False
    try:
        yield
    finally:
        backend.deterministic, backend.benchmark = saved


def free_memory() -> None:
    """After a stage dropped its models: collect them and hand the GPU's cached blocks back."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def map_batches(fn: Callable[[Sequence[T]], list[R]], items: Sequence[T], batch_size: int,
                on_batch: Optional[Callable[[int], None]] = None) -> list[R]:
    """Apply `fn` to consecutive batches; on out-of-memory halve the batch and retry (down to 1)."""
    out: list[R] = []
    i = 0
    while i < len(items):
        batch = items[i:i + batch_size]
        try:
            out.extend(fn(batch))
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if not is_oom(e) or batch_size == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            batch_size = max(1, batch_size // 2)
            continue
        i += len(batch)
        if on_batch is not None:
            on_batch(len(batch))
    return out
