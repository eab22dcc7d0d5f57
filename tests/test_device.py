"""Devices and bf16 autocast: `amp: auto` trains in bfloat16 only where the hardware computes in it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs.loader import validate_config
from models.device import choose_amp, cpu_has_bf16_units


@pytest.mark.parametrize("setting, device, units, enabled, warning, words", [
    ("auto", "cpu", True, True, False, "bf16 autocast"),
    ("auto", "cpu", False, False, False, "no bfloat16 units"),
    ("auto", "cuda", True, True, False, "bf16 autocast"),
    ("auto", "cuda", False, False, False, "float32"),
    ("auto", "mps", True, False, False, "float32"),
    (True, "cpu", False, True, True, "emulated"),
    (True, "cpu", True, True, False, "bf16 autocast"),
    (False, "cpu", True, False, False, "float32"),
])
def test_amp_auto_uses_bf16_only_where_the_hardware_computes_in_it(setting, device, units, enabled, warning, words):
    choice = choose_amp(setting, device, units)
    assert (choice.enabled, choice.warning) == (enabled, warning)
    assert words in choice.message and "\n" not in choice.message


def test_amp_defaults_to_auto_and_takes_true_false_or_auto():
    assert validate_config({}).amp == "auto"
    assert [validate_config({"amp": value}).amp for value in (True, False, "auto")] == [True, False, "auto"]
    with pytest.raises(Exception, match="amp"):
        validate_config({"amp": "fast"})


def test_the_bf16_probe_agrees_with_the_cpus_own_flags():
    """On the x86 Linux machines we test on: AVX512-BF16 or AMX, as the kernel lists the CPU's flags."""
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    assert cpu_has_bf16_units() == bool({"avx512_bf16", "amx_bf16"} & set(flags))


def test_a_cpu_whose_kernels_are_limited_to_avx2_gets_float32():
    """torch's kernels held to AVX2, as on a CPU without bf16 units: auto picks float32, a forced `amp: true` warns."""
    probe = ("from models.device import resolve_amp; "
             "print(resolve_amp('auto', 'cpu').enabled, resolve_amp(True, 'cpu').warning)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert result.stdout.split() == ["False", "True"]
