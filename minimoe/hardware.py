"""Peak throughput of common accelerators, for model FLOPs utilization (MFU).

MFU = (training FLOPs per token x tokens per second) / the chip's peak FLOP/s  (PaLM, App. B).
The peaks are the vendors' dense (no 2:4 sparsity) tensor-core numbers in bf16 with fp32
accumulation, which is what bf16 autocast runs; chips without bf16 list their fp16 figure.
A CPU has no entry: its "peak" depends on cores, clocks and vector units, so MFU is None there.

Also here: describe_machine() for reports, format_bytes() for messages about memory and disk, and, for CPU runs, keep_freed_memory(), which stops glibc from unmapping large freed buffers
(a page-fault tax on every step's activations; see its docstring).
"""

import ctypes
import os
from pathlib import Path
import platform
import sys

import torch

TFLOPS = 1e12

PEAK_FLOPS = {                 # substring of torch.cuda.get_device_name() -> FLOP/s
    "B200": 2250 * TFLOPS,
    "H200": 989 * TFLOPS,      # same tensor cores as H100 SXM, more memory
    "GH200": 989 * TFLOPS,
    "H100 NVL": 835 * TFLOPS,
    "H100 PCIe": 756 * TFLOPS,
    "H100": 989 * TFLOPS,      # "NVIDIA H100 80GB HBM3" is the SXM part
    "H800": 989 * TFLOPS,
    "A100": 312 * TFLOPS,      # SXM and PCIe
    "A800": 312 * TFLOPS,
    "L40S": 362 * TFLOPS,
    "L40": 181 * TFLOPS,
    "L4": 121 * TFLOPS,
    "A10G": 70 * TFLOPS,       # AWS part; not in NVIDIA's datasheets, commonly quoted figure
    "A10": 125 * TFLOPS,
    "RTX 6000 Ada": 364 * TFLOPS,
    "RTX A6000": 155 * TFLOPS,
    "RTX 4090": 165 * TFLOPS,  # GeForce: fp32 accumulation runs at half the fp16-accumulate rate
    "RTX 3090": 71 * TFLOPS,
    "V100": 125 * TFLOPS,      # fp16 (no bf16 on Volta)
    "T4": 65 * TFLOPS,         # fp16 (no bf16 on Turing)
    "MI300X": 1307 * TFLOPS,   # AMD (ROCm reports the name through torch.cuda)
    "MI250X": 383 * TFLOPS,
}


def peak_flops_for_name(name: str) -> float | None:
    """Longest table key contained in `name` (so "A100" wins over "A10", "H100 PCIe" over "H100")."""
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return PEAK_FLOPS[key]
    return None


def peak_flops(device) -> float | None:
    """Peak bf16 FLOP/s of a CUDA device, or None (CPU, MPS, or a GPU not in the table)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def mfu(flops_per_token: float, tokens_per_sec: float, peak: float | None) -> float | None:
    """Fraction of the peak that the training run achieves (0..1), or None without a peak."""
    if not peak or not tokens_per_sec:
        return None
    return flops_per_token * tokens_per_sec / peak


def describe_machine(device) -> str:
    """One line for a report: the GPU, or the CPU with the threads in use; the OS, Python and torch."""
    device = torch.device(device)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        names = [s.split(":", 1)[1].strip() for s in Path("/proc/cpuinfo").read_text().splitlines()
                 if s.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
        where = f"{names[0] if names else platform.processor() or platform.machine()}, " \
                f"{torch.get_num_threads()} thread(s) of {os.cpu_count()} logical cores"
    return f"{where}; {platform.system()} {platform.release()}, Python {platform.python_version()}, " \
           f"torch {torch.__version__}"


def format_bytes(n: float) -> str:
    """Bytes for people: '3.2 GiB', or '512 MiB' below a GiB."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def keep_freed_memory() -> bool:
    """CPU speed: ask glibc's malloc to keep large freed buffers for reuse instead of unmapping them.

    PyTorch's CPU allocator is plain malloc. glibc maps every buffer over 32 MiB separately and unmaps
    it on free (and trims the heap top), so the next step's tensor of the same size is mapped afresh
    and page-faults on every first write: a (tokens x hidden) activation of 4096 x 1024 fp32 is such a
    buffer. In `python -m minimoe.bench` (4096 tokens, hidden 1024) this tax was 22-28% of the MoE
    layer's forward+backward, most of it in element-wise work (SiLU, products) that writes fresh
    buffers. Afterwards the process keeps its peak memory mapped, which a training loop reaches every
    step anyway.

    Process-wide and idempotent, like torch.set_num_threads. Returns True where it took effect (Linux
    with glibc), False elsewhere (macOS, Windows, musl), where it does nothing.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):           # not glibc
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
