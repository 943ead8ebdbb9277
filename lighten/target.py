"""The deployment target: the runtime and CPU a compressed model is built for.

Facts that depend on where the model will run — the channel block CPU kernels tile by
(``prune.channels round_to: auto``), whether int8 weights must keep to 7 bits
(``reduce_range``), what the measured latency stands for — are read from a :class:`Target`,
never from the machine that happens to run the step. A recipe names it
(``deploy: {backend, cpu, threads}``); ``cpu: auto`` (the default) resolves to this machine.

This module is also the one place that reads this machine's CPU flags (``/proc/cpuinfo``);
:mod:`lighten.provenance` records them from here.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from lighten.errors import RecipeError, did_you_mean

# CPU classes a target may name, oldest first. What each implies for int8 and fp32 kernels:
#   generic      no x86 SIMD assumed (ARM NEON, other): 4-lane 128-bit units, no u8 x s8
#                saturation hazard, no VNNI
#   avx2         x86 with 256-bit AVX2 (and older x86: SSSE3's pmaddubsw saturates the same way)
#   avx2_vnni    AVX2 plus AVX-VNNI (Alder Lake and later client cores, Sierra Forest)
#   avx512       AVX-512F without VNNI (Skylake-SP/X)
#   avx512_vnni  AVX-512 VNNI (Cascade Lake, Ice Lake, Zen 4 and later)
#   amx          AMX-INT8 tiles (Sapphire Rapids and later; implies avx512_vnni)
CPUS: tuple[str, ...] = ("generic", "avx2", "avx2_vnni", "avx512", "avx512_vnni", "amx")
CPU_CHOICES: tuple[str, ...] = ("auto", *CPUS)  # what a recipe's deploy.cpu accepts

_AVX512 = frozenset({"avx512", "avx512_vnni", "amx"})
_VNNI = frozenset({"avx2_vnni", "avx512_vnni", "amx"})
_X86 = frozenset(CPUS) - {"generic"}
_X86_MACHINES = ("x86_64", "amd64", "i386", "i686", "x86")

# The instruction sets that decide kernel speed: VNNI makes int8 dot products several times
# faster than fp32, BF16/AMX change what a float runtime computes in. "AMD EPYC" alone hides them.
SPEED_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


@lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first CPU's ``key: value`` lines of /proc/cpuinfo (empty where it is unreadable)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _cpuinfo_flags() -> frozenset[str] | None:
    """This machine's CPU flags; None where /proc/cpuinfo is unreadable."""
    flags = _cpuinfo().get("flags")
    return None if flags is None else frozenset(flags.split())


def cpu_model() -> str:
    """This CPU's model name (e.g. "AMD EPYC 9654 96-Core Processor")."""
    return (_cpuinfo().get("model name") or platform.processor() or platform.machine()
            or "unknown")


def cpu_features() -> list[str]:
    """Which of ``SPEED_FEATURES`` this CPU has (empty where /proc/cpuinfo is unreadable)."""
    flags = _cpuinfo_flags() or frozenset()
    return [f for f in SPEED_FEATURES if f in flags]


def cpu_class(flags: set[str] | frozenset[str] | None, machine: str) -> str:
    """The :data:`CPUS` class of a CPU with these flags on this ``platform.machine()``.

    An x86 CPU whose flags are unknown, or that predates AVX2, is ``avx2``: the 8-channel block
    is a multiple of SSE's 4 lanes and its u8 x s8 kernels saturate like AVX2's, so the
    conservative choices (7-bit weights) hold.
    """
    if machine.lower() not in _X86_MACHINES:
        return "generic"
    flags = flags or frozenset()
    if "amx_int8" in flags:
        return "amx"
    if "avx512f" in flags:
        return "avx512_vnni" if "avx512_vnni" in flags else "avx512"
    if "avx_vnni" in flags or "avx512_vnni" in flags:
        return "avx2_vnni"
    return "avx2"


def this_machine_cpu() -> str:
    """This machine's CPU class (what ``cpu: auto`` resolves to)."""
    return cpu_class(_cpuinfo_flags(), platform.machine())


def check_cpu(value: object) -> str:
    """``value`` if it names a CPU class or ``auto``; else a ValueError naming the choices (the
    recipe loader turns it into one line: ``deploy.cpu: Input should be one of: ...``)."""
    if isinstance(value, str) and value in CPU_CHOICES:
        return value
    raise ValueError(f"Input should be one of: {', '.join(CPU_CHOICES)}"
                     f"{did_you_mean(value, CPU_CHOICES)}")


@dataclass(frozen=True)
class Target:
    """Where a model will run: ``backend`` (a name in ``lighten.backends.BACKENDS``), ``cpu``
    (one of :data:`CPUS`, resolved: never ``auto``) and ``threads`` (None = all usable cores)."""

    backend: str = "onnxruntime"
    cpu: str = "auto"
    threads: int | None = None

    def __post_init__(self):
        from lighten.backends import check_backend

        for key, check in (("backend", check_backend), ("cpu", check_cpu)):
            value = getattr(self, key)
            try:
                check(value)
            except ValueError as err:
                raise RecipeError(f"deploy.{key}: {err} (got {value!r})") from None
        if self.threads is not None and (isinstance(self.threads, bool)
                                         or not isinstance(self.threads, int) or self.threads < 1):
            raise RecipeError(f"deploy.threads: must be a positive integer, got "
                              f"{self.threads!r}; None uses all available cores")
        if self.cpu == "auto":
            object.__setattr__(self, "cpu", this_machine_cpu())

    @classmethod
    def this_machine(cls, backend: str = "onnxruntime", threads: int | None = None) -> Target:
        """The machine running lighten, as a target (what ``cpu: auto`` means)."""
        return cls(backend=backend, cpu="auto", threads=threads)

    @classmethod
    def from_deploy(cls, deploy: Any) -> Target:
        """From a recipe's ``deploy:`` block (a ``DeployConfig``), ``cpu: auto`` resolved."""
        return cls(backend=deploy.backend, cpu=getattr(deploy, "cpu", "auto"),
                   threads=deploy.threads)

    @property
    def is_x86(self) -> bool:
        return self.cpu in _X86

    @property
    def has_avx512(self) -> bool:
        return self.cpu in _AVX512

    @property
    def has_vnni(self) -> bool:
        """int8 dot products in one instruction (u8 x s8 -> s32, no int16 intermediate)."""
        return self.cpu in _VNNI

    @property
    def has_amx(self) -> bool:
        return self.cpu == "amx"

    @property
    def simd_channel_block(self) -> int:
        """fp32 lanes of the target's widest vector unit: the channel block CPU runtimes tile
        convolutions by (ONNX Runtime's NCHWc and oneDNN's nChw16c / nChw8c layouts). A layer
        whose width is not a multiple is padded up to one, so the channels in between cost as
        much as the full block. 8 off AVX-512: AVX2's block, and a multiple of the 4 lanes of
        128-bit units (SSE, NEON)."""
        return 16 if self.has_avx512 else 8

    @property
    def reduce_range(self) -> bool:
        """7-bit int8 weights by default: x86 without VNNI multiplies u8 x s8 pairs into int16
        (vpmaddubsw), which saturates with full-range weights. Measured on an AVX2 machine: up
        to 25 output LSB off with 8-bit weights, exact with 7-bit."""
        return self.is_x86 and not self.has_vnni

    def latency_note(self, measured_on: Target | None = None) -> str | None:
        """A line for the run notes when latency is measured on another CPU than the target's
        (``measured_on`` defaults to this machine); None when they agree."""
        here = (measured_on or Target.this_machine()).cpu
        if here == self.cpu:
            return None
        return (f"latency measured on {here}, target {self.cpu}: timings are of this machine, "
                f"not the target")

    def to_dict(self) -> dict[str, Any]:
        """What provenance records: the target and the facts steps derived from it."""
        return {"backend": self.backend, "cpu": self.cpu, "threads": self.threads,
                "simd_channel_block": self.simd_channel_block, "has_vnni": self.has_vnni,
                "reduce_range": self.reduce_range}

    def __str__(self) -> str:
        threads = f", {self.threads} threads" if self.threads else ""
        return f"{self.backend} on {self.cpu}{threads}"


__all__ = ["CPUS", "CPU_CHOICES", "SPEED_FEATURES", "Target", "check_cpu", "cpu_class",
           "cpu_features", "cpu_model", "this_machine_cpu"]
