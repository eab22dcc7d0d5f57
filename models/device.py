"""Choosing the torch device and whether to train under bfloat16 autocast; probed only when asked, never at import.

bf16 autocast pays where the hardware multiplies bfloat16: CUDA GPUs, and CPUs with AVX512-BF16 or AMX units
(2.3x the float32 matmul rate on the AMD EPYC these figures come from). Elsewhere it is emulated: on an AVX2-only
CPU a pretraining epoch of configs/fashion_mnist.yaml took 32 s with it and 2.5 s without.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Plain modules, not `torch.backends.mps` in code: Prefect 3.9's bundles pickle this module by value, and
# cloudpickle then also pickles the submodules a function reaches by attribute, which fails for torch.backends.
from torch.backends import cpu as cpu_backend
from torch.backends import mps

from configs.errors import UserError


def resolve_device(name: str) -> str:
    """'auto' picks CUDA, then Apple's MPS, then the CPU; an explicit device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if mps.is_available():
            return "mps"
        return "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda was asked for but torch sees no CUDA device; set device: auto or cpu")
    if name == "mps" and not mps.is_available():
        raise UserError("device: mps was asked for but this torch build has no MPS device; set device: auto or cpu")
    return name


def cpu_has_bf16_units() -> bool:
    """True when this CPU multiplies bfloat16 in hardware and torch's kernels use it, as torch reports it.

    x86: AVX512-BF16 or AMX-BF16, with torch's kernels at the AVX512 level (`ATEN_CPU_CAPABILITY=avx2` holds
    them to AVX2, as on a CPU without the units). Arm: the BF16 extension. A torch without
    `torch.cpu.get_capabilities` (older than 2.14) gets float32.
    """
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is None:
        return False
    capabilities = get_capabilities()
    if capabilities.get("architecture") in ("x86_64", "x86"):
        units = capabilities.get("avx512_bf16") or capabilities.get("amx_bf16")
        return bool(units) and cpu_backend.get_cpu_capability() == "AVX512"
    return bool(capabilities.get("bf16") or capabilities.get("sve_bf16"))


BF16_FEATURES = ("avx2", "avx512_f", "avx512_bf16", "amx_bf16")  # what decides bf16 speed on x86


def cpu_summary() -> str:
    """One line for benchmark reports: the CPU, which of BF16_FEATURES torch sees, and the level of its kernels."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    capabilities = get_capabilities() if get_capabilities else {}
    features = " ".join(f"{name}{'+' if capabilities.get(name) else '-'}" for name in BF16_FEATURES)
    return (f"CPU {capabilities.get('cpu_name', 'unknown')}: {features if capabilities else 'features unknown'}; "
            f"torch kernels {cpu_backend.get_cpu_capability()}")


class AmpChoice(NamedTuple):
    enabled: bool  # train under bf16 autocast
    message: str  # one line saying what was chosen and why
    warning: bool  # amp: true forced onto hardware that emulates bf16


def choose_amp(setting: bool | str, device: str, bf16_units: bool) -> AmpChoice:
    """Whether to train under bf16 autocast.

    Args:
        setting: the config's `amp`: True, False or "auto".
        device: the resolved device ("cpu", "cuda", "mps").
        bf16_units: whether the device computes in bfloat16 (`cpu_has_bf16_units()`, `torch.cuda.is_bf16_supported()`).
    """
    if device == "mps":
        return AmpChoice(setting is True, f"amp {setting}: {'bf16 autocast on' if setting is True else 'float32'} (MPS)",
                         False)
    hardware = {"cuda": "this GPU", "cpu": "this CPU"}[device]
    if setting == "auto":
        if bf16_units:
            return AmpChoice(True, f"amp auto: bf16 autocast, {hardware} computes in bfloat16", False)
        return AmpChoice(False, f"amp auto: float32, {hardware} has no bfloat16 units (bf16 would be emulated)", False)
    if setting and not bf16_units:
        return AmpChoice(True, f"amp true: bf16 autocast, but {hardware} has no bfloat16 units, so it is emulated "
                         "(about 10x slower than float32 on an AVX2 CPU); set amp: auto", True)
    return AmpChoice(bool(setting), f"amp {str(setting).lower()}: {'bf16 autocast' if setting else 'float32'}", False)


def resolve_amp(setting: bool | str, device: str) -> AmpChoice:
    """`choose_amp` with this machine's bf16 support probed."""
    units = torch.cuda.is_bf16_supported() if device == "cuda" else cpu_has_bf16_units() if device == "cpu" else False
    return choose_amp(setting, device, units)
