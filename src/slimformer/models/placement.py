"""Where a model's weights live and where its math runs: the `--dtype` it loads in, the `--device`
its blocks compute on, moving one block (or the whole model) there and back, and the peak memory
a run reached."""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from slimformer.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
HOST = torch.device("cpu")


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """`auto` (a GPU when torch sees one, else the CPU), `cpu`, `cuda` or `cuda:N` -> a device;
    UserError for anything else or a GPU that is not there."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else HOST
    if spec == "cpu":
        return HOST
    if spec == "cuda" or spec.startswith("cuda:"):
        index = spec.partition(":")[2] or "0"
        if not index.isdigit():
            raise UserError(f"--device {spec!r}: expected cuda or cuda:N with N a GPU index.")
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: torch sees no CUDA GPU on this machine "
                            f"(torch {torch.__version__}); use --device cpu or auto.")
        count = torch.cuda.device_count()
        if int(index) >= count:
            raise UserError(f"--device {spec}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}.")
        return torch.device(f"cuda:{index}")
    raise UserError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N.")


def resolve_dtype(spec: str | torch.dtype | None, config: Any = None) -> torch.dtype:
    """`auto` (the checkpoint's dtype from its config, float32 when it names none or a
    non-float type), `float32`, `bfloat16` or `float16` -> a torch dtype; UserError otherwise."""
    if isinstance(spec, torch.dtype):
        if spec not in DTYPES.values():
            raise UserError(f"dtype {spec}: expected one of {', '.join(DTYPE_CHOICES)}.")
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        name = str(stored).removeprefix("torch.") if stored is not None else "float32"
        return DTYPES.get(name, torch.float32)
    if spec not in DTYPES:
        raise UserError(f"--dtype {spec!r}: expected one of {', '.join(DTYPE_CHOICES)}.")
    return DTYPES[spec]


def check_runs_on(dtype: torch.dtype, device: torch.device) -> None:
    """UserError when `device` cannot compute in `dtype` (bfloat16 on a GPU older than Ampere)."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UserError(f"{torch.cuda.get_device_name(device)} cannot compute in bfloat16; "
                        "use --dtype float16 or float32.")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (the first one found; float32 if none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def to_device(obj: Any, device: torch.device | None, dtype: torch.dtype | None = None,
              memo: dict[int, torch.Tensor] | None = None) -> Any:
    """`obj` with every tensor inside (nested tuples, lists, dicts) moved to `device` (None: where
    it is), and its floating-point tensors cast to `dtype` when given. With `memo` (a dict), a
    tensor met several times is converted once and stays one tensor."""
    if isinstance(obj, torch.Tensor):
        if memo is not None and id(obj) in memo:
            return memo[id(obj)]
        cast = dtype if dtype is not None and obj.is_floating_point() else None
        out = obj.to(device=device, dtype=cast, non_blocking=True) if device is not None or cast else obj
        if memo is not None:
            memo[id(obj)] = out
        return out
    if isinstance(obj, tuple):
        return tuple(to_device(x, device, dtype, memo) for x in obj)
    if isinstance(obj, list):
        return [to_device(x, device, dtype, memo) for x in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, dtype, memo) for k, v in obj.items()}
    return obj


def module_device(module: nn.Module) -> torch.device:
    """Where the module's first parameter or buffer lives (the CPU for an empty module)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return HOST


def input_device(model: Any) -> torch.device:
    """Where a model's inputs go: a torch module's device, the host for anything else (an
    onnxruntime session, a llama.cpp model take host tensors)."""
    return module_device(model) if isinstance(model, nn.Module) else HOST


@contextlib.contextmanager
def onloaded(module: nn.Module, device: torch.device | None, compute_dtype: torch.dtype | None = None) -> Iterator[nn.Module]:
    """`module` moved to `device` for the `with` body, then back where it was: one block at a time
    on the GPU while the rest of the model stays on the host. With `compute_dtype` (float32 for a
    bf16/fp16 model), its lower-precision parameters are upcast for the body and rounded back to
    their stored dtype after, so a calibration sees fp32 activations; layers swapped in during the
    body keep their own dtypes. An object that is not a torch module (an onnxruntime session) is
    left as it is."""
    if not isinstance(module, nn.Module) or (device is None and compute_dtype is None):
        yield module
        return
    home = module_device(module)
    # weak references: a layer the method swaps out is freed when it drops it, not at the end of the body
    stored = [(weakref.ref(m), name, p.dtype) for m in module.modules() for name, p in m.named_parameters(recurse=False)
              if compute_dtype is not None and p.is_floating_point() and p.dtype != compute_dtype]
    if device is not None and device != home:
        module.to(device)
    for ref, name, _ in stored:
        m = ref()
        m._parameters[name].data = m._parameters[name].data.to(compute_dtype)
    try:
        yield module
    finally:
        alive = {id(m) for m in module.modules()}  # a layer swapped out is dropped, not rounded back
        for ref, name, dtype in stored:
            m = ref()
            p = m._parameters.get(name) if m is not None and id(m) in alive else None
            if p is not None and p.dtype == compute_dtype:
                p.data = p.data.to(dtype)
        if device is not None and device != home:
            module.to(home)


def compute_dtype_for(model: nn.Module) -> torch.dtype | None:
    """float32 when the model is stored in bf16/fp16 (its blocks calibrate in fp32), else None."""
    return torch.float32 if model_dtype(model) in (torch.bfloat16, torch.float16) else None


def release_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere). The layer-wise
    methods free a block's float weights and scratch tensors of 0.1-30 MB each; glibc keeps such
    chunks for reuse, and over a model's blocks they add up to hundreds of MB of resident memory."""
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


def _vm_hwm_bytes() -> int | None:
    """VmHWM from /proc/self/status (Linux), or None where there is no such file."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


def peak_memory(device: torch.device | None = None) -> dict[str, int | None]:
    """Peak resident memory of this process so far, and the peak GPU memory torch allocated on
    `device` (None on the CPU), in bytes. On Linux the peak is VmHWM, this address space's own high
    water mark: `ru_maxrss` survives exec, so a process started from a bigger one (a test runner
    holding a model) would report its parent's peak."""
    rss_bytes = _vm_hwm_bytes()
    if rss_bytes is None:
        import resource  # POSIX only: imported where it is used

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes
    gpu = torch.cuda.max_memory_allocated(device) if device is not None and device.type == "cuda" else None
    return {"peak_rss_bytes": int(rss_bytes), "peak_device_bytes": gpu}
