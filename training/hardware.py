"""Where and how training runs: device, torchrun process group, mixed precision, memory layout.

``mien train`` runs unchanged under ``torchrun``: :func:`init_distributed` reads the variables torchrun
sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and joins the process group (NCCL on GPUs, gloo on CPU).
Without them it is a single process and nothing here touches ``torch.distributed``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from mien.machine import allocator
from mien.training.config import AMP_MODES, DEVICES

log = logging.getLogger("mien.train")

#: torch 2.13 CPU segfaults in the backward of a 1×1 stride-2 convolution in channels-last on inputs this
#: large or larger (DESIGN.md, "Facts about the machines").
CHANNELS_LAST_CRASH_SIDE = 64


@dataclass(frozen=True)
class Process:
    """This process's place in the run: rank, number of processes, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, logs, plots and the history."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this rank's GPU when CUDA is available, else the CPU; ``cpu``; ``cuda``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but this torch sees no CUDA device (torch.cuda.is_available() is False)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ValueError(f"--device must be one of {DEVICES}, got {name!r}")
    return torch.device("cpu")


def init_distributed(device_name: str) -> Process:
    """Join torchrun's process group when launched by torchrun; a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Process(rank, world_size, local_rank, device)


def close_distributed(process: Process, finished: bool = True) -> None:
    """Leave the process group; after a finished run, first wait for every rank (rank 0 may still be saving)."""
    if process.distributed and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], process: Process) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (the values themselves in a single process)."""
    if not process.distributed:
        return list(values)
    device = process.device if process.device.type == "cuda" else torch.device("cpu")  # NCCL reduces on GPU
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and what says so. On a CPU without AMX or AVX-512 BF16, bf16
    autocast is emulated and 10-14× slower a training step than fp32 (docs/training.md, "Precision by machine")."""
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        return native, f"{torch.cuda.get_device_name(device)} {'computes' if native else 'does not compute'} bf16"
    probes = (("AMX", "_is_amx_tile_supported"), ("AVX-512 BF16", "_is_avx512_bf16_supported"))
    found = [name for name, probe in probes if getattr(torch.cpu, probe, lambda: False)()]
    if found:
        return True, f"this CPU has {' and '.join(found)}"
    capability = torch.backends.cpu.get_cpu_capability()
    return False, f"this CPU has neither AMX nor AVX-512 BF16 (torch's CPU capability: {capability})"


def resolve_amp(amp: str, device: torch.device) -> str:
    """The precision a run trains in: ``amp`` itself, or for ``auto`` bf16 where ``device`` computes it natively
    and none (fp32) elsewhere. A resumed run resolves again, so a run moved to another machine takes its speed."""
    check_amp(amp, device)
    if amp != "auto":
        return amp
    native, why = native_bf16(device)
    resolved = "bf16" if native else "none"
    log.info("--amp auto: %s, since %s", "bf16 autocast" if native else "fp32", why)
    return resolved


def precision_name(amp: str) -> str:
    """What a resolved ``amp`` trains in, as history rows and logs say it: fp32, bf16 or fp16."""
    return "fp32" if amp == "none" else amp


@contextmanager
def flushing_denormals() -> Iterator[bool]:
    """Within the block, treat subnormal floats (below 1.2e-38 in fp32) as zero on the CPU, in this thread and in
    the threads torch starts inside it; yields whether the CPU supports it. Enter it before the first parallel
    operation: a new thread inherits the floating-point mode of the thread that creates it, and torch's pool of CPU
    threads is created once. Subnormals cost x86 CPUs tens of times a normal operation; a run whose weights,
    optimiser moments or activations drift into them slows down without changing its results measurably (the
    converged sgan went from 1.0 to 3.2 s a step by epoch 42, with thousands of subnormal discriminator weights:
    docs/training.md, "Subnormal floats"). On leaving, this thread computes subnormals again, so a process that
    trains in-process (a notebook, the tests) gets its default floating-point mode back."""
    supported = torch.set_flush_denormal(True)
    try:
        yield supported
    finally:
        torch.set_flush_denormal(False)


def allocator_note() -> str:
    """The memory allocator this process runs on, as a run's log says it; under glibc's, how to preload a faster one.
    glibc returns each activation above 32 MB to the kernel when it is freed and maps it afresh on the next step, so
    the models with large activations (the SR arms' 96×96 maps) spend a sixth of their CPU time in the kernel
    (docs/training.md, "The memory allocator")."""
    name = allocator()
    if name != "glibc":
        return f"memory allocator {name}"
    return (
        "memory allocator glibc; tcmalloc trains faster (LD_PRELOAD=libtcmalloc_minimal.so.4, which "
        "scripts/train_plan.sh sets when the library is installed: docs/training.md, 'The memory allocator')"
    )


def check_amp(amp: str, device: torch.device) -> None:
    """Refuse a precision this device cannot train in."""
    if amp not in AMP_MODES:
        raise ValueError(f"--amp must be one of {AMP_MODES}, got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(
            "--amp fp16 trains with a GradScaler on a GPU only; on the CPU use --amp bf16 (or none), "
            "and see docs/training.md: on this project's CPU bf16 is slower than fp32 for most models"
        )


def channels_last_hazards(model: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """The 1×1 stride-2 convolutions that see inputs ≥ 64×64 for a ``(C, H, W)`` input: where torch
    2.13's CPU backward crashes in channels-last. Found by one forward pass (no backward) in NCHW."""
    found: list[str] = []

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if max(inputs[0].shape[-2:]) >= CHANNELS_LAST_CRASH_SIDE:
                found.append(f"{name} (input {tuple(inputs[0].shape[-2:])})")

        return record

    suspects = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
    ]
    if not suspects:
        return []
    handles = [m.register_forward_hook(hook(name)) for name, m in suspects]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *input_shape))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return found


def use_channels_last(model: nn.Module, input_shape: tuple[int, ...], wanted: bool, device: torch.device) -> bool:
    """Whether to train in channels-last: as asked, except on the CPU for models that would crash in it."""
    if not wanted or device.type != "cpu":
        return wanted
    hazards = channels_last_hazards(model, input_shape)
    if hazards:
        log.warning(
            "training in NCHW instead of channels-last: torch 2.13 CPU crashes in the backward of 1×1 stride-2 "
            "convolutions on inputs of %d×%d or more, and this model has %s",
            CHANNELS_LAST_CRASH_SIDE, CHANNELS_LAST_CRASH_SIDE, ", ".join(hazards),
        )  # fmt: skip
        return False
    return True


def in_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` in the memory layout of a channels-last model (or as it is): a batch in the other layout makes
    every convolution convert it first (~1.3x slower on CPU)."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
