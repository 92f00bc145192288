"""Device, mixed precision and memory layout chosen once per run from the config."""

from __future__ import annotations

import collections
import contextlib
import copy
import os
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from histosynth.errors import UserError


class NonFiniteLossError(UserError, RuntimeError):
    """A loss became NaN or Inf; training stopped and the last good checkpoint was kept."""


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module):
    """Put ``modules`` in eval mode for the block and restore each one's own mode after."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def compiled(module: torch.nn.Module, on: bool, key: str = "train.compile") -> Callable:
    """What a training step calls to run ``module``: the module itself, or (``on``: the run's path
    is compiled, :attr:`Runtime.compiled`) torch.compile's wrapper, which shares its parameters
    and buffers; optimizers, EMA and checkpoints keep using the plain module. A module with a
    parametrization (spectral norm) stays eager: its in-place power-iteration update breaks the
    compiled backward when it runs twice before one backward (real and fake batches; torch 2.15)."""
    if not on:
        return module
    inductor_cache_per_kernel_level()
    from torch.nn.utils import parametrize
    if any(parametrize.is_parametrized(m) for m in module.modules()):
        warnings.warn(f"{key}: {type(module).__name__} uses spectral norm and stays eager; the "
                      "other networks are compiled", stacklevel=2)
        return module
    return torch.compile(module)


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the eval-mode ``model`` for prediction, each BatchNorm that only a convolution
    feeds folded into that convolution (``torch.nn.utils.fusion.fuse_conv_bn_eval``; the BatchNorm
    becomes an identity). The pairs are read from torch.fx's graph of the model, or of each part
    that torch.fx can trace where the whole has data-dependent control flow (smp's FPN, Linknet,
    ...); the modules keep their classes and attributes. The same predictions up to rounding,
    faster: compare_monuseg's U-Net predicting the 14 MoNuSeg test images (1000 px) on 2 Zen 4
    cores, 5.94 -> 5.61 s in bf16 and 11.96 -> 10.63 s in fp32 held to AVX2 (in turns)."""
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (a training BatchNorm uses the batch's statistics)")
    model = copy.deepcopy(model)
    _fold_into(model)
    return model


def _fold_into(module: torch.nn.Module) -> None:
    from torch.fx import symbolic_trace
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if not any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules()):
        return
    try:
        graph = symbolic_trace(module).graph
    except (ValueError, RuntimeError, TypeError):   # TraceError (control flow on values), len(proxy): by parts
        for child in module.children():
            _fold_into(child)
        return
    calls = [n for n in graph.nodes if n.op == "call_module"]
    uses = collections.Counter(n.target for n in calls)          # a module called twice is shared: left alone
    parts = dict(module.named_modules())
    for bn_node in calls:
        bn, conv_node = parts[bn_node.target], bn_node.args[0] if bn_node.args else None
        if not (isinstance(bn, torch.nn.BatchNorm2d) and bn.track_running_stats and uses[bn_node.target] == 1):
            continue
        if (isinstance(conv_node, torch.fx.Node) and conv_node.op == "call_module" and uses[conv_node.target] == 1
                and len(conv_node.users) == 1 and isinstance(parts[conv_node.target], torch.nn.Conv2d)):
            _replace(module, conv_node.target, fuse_conv_bn_eval(parts[conv_node.target], bn))
            _replace(module, bn_node.target, torch.nn.Identity())


def _replace(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend would call (``$CXX``, else ``c++`` / ``g++`` /
    ``clang++`` on the PATH), or None: without one, compiled CPU steps cannot run."""
    import shutil
    return next((path for name in (os.environ.get("CXX"), "c++", "g++", "clang++")
                 if name and (path := shutil.which(name))), None)


HELD_KERNELS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
FUSED_ON_CPU = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)    # fused Adam / AdamW on CPUs


def inductor_cache_per_kernel_level() -> None:
    """Give a process whose torch is held below its CPU's kernels (``ATEN_CPU_CAPABILITY``,
    ``ONEDNN_MAX_CPU_ISA``) a torch.compile kernel cache of its own, unless
    ``TORCHINDUCTOR_CACHE_DIR`` names another folder than torch's default (importing
    ``torch._inductor`` sets the variable to that default). Inductor's on-disk graph cache does
    not key on those variables (torch 2.14): on a Zen 4 EPYC, a DCGAN step compiled with the CPU's
    own kernels and loaded from the cache by a process held to AVX2 trained to NaN at its first
    step, and the other way round the process aborted (``free(): invalid pointer``)."""
    held = [os.environ.get(k) for k in HELD_KERNELS]
    if not any(held):
        return
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) == default_cache_dir():
        level = "-".join((v or "default").lower() for v in held)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default_cache_dir()}-{level}"


def _onednn_isa_allows(*prefixes: str) -> bool:
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return isa == "ALL" or isa.startswith(prefixes)


def cpu_kernels_avx512() -> bool:
    """May torch's CPU kernels, ATen's and oneDNN's, use AVX-512 here? No on AVX2-only CPUs (most
    laptops, many AMD EPYC) and when ``ATEN_CPU_CAPABILITY=avx2`` or ``ONEDNN_MAX_CPU_ISA=AVX2``
    hold a bigger CPU to AVX2 kernels."""
    if not _onednn_isa_allows("AVX512", "AVX10"):
        return False
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")
    except (AttributeError, RuntimeError):
        return False


def cpu_has_fast_bf16() -> bool:
    """Does this CPU compute bf16 natively (Intel AMX tiles or AVX-512 BF16), and may torch use it?
    Held to AVX2 kernels (see :func:`cpu_kernels_avx512`) bf16 is emulated and slower than fp32,
    so the answer is no."""
    if not (cpu_kernels_avx512() and _onednn_isa_allows("AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX10")):
        return False
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_facts() -> dict:
    """What the figures depend on: the CPU model, its bf16/AMX/AVX flags and the kernels torch uses
    (``ATEN_CPU_CAPABILITY`` and ``ONEDNN_MAX_CPU_ISA`` can hold a bigger CPU to AVX2)."""
    flags, model = set(), platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "cpu_flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                                        if f in flags],
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "default")}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU; an explicit choice is checked."""
    return Runtime.from_choices(device, "off", "off").device


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None      # None: full fp32
    channels_last: bool
    rank: int = 0                      # data-parallel: this process, of ``world`` (torchrun)
    world: int = 1
    fused_optimizers: bool = True      # off: the plain per-tensor optimizer loop (the benchmarks' reference path)
    compiled: bool = False             # the training steps run the networks through torch.compile

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world

    @classmethod
    def from_choices(cls, device: str = "auto", amp: str = "auto", channels_last: str = "auto",
                     cpu_fast_path: bool = False, compile: str = "off") -> "Runtime":
        """Resolve the config's choices. ``auto`` means: on CUDA, bf16 autocast (where supported)
        and channels_last; on a CPU, the same when ``cpu_fast_path`` (the model family gains from
        it: measured for the GANs, 4x on SNGAN-32 with AMX) and the CPU has native bf16
        (AMX or AVX-512 BF16), else fp32 NCHW (EfficientNet's depthwise convs are slower in bf16).
        ``compile``: ``on`` compiles the training steps (a CPU needs a C++ compiler for it);
        the rule for ``auto`` is eager (on a CPU, :meth:`candidates` adds compiled paths to measure)."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("train.device is 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
        dev = torch.device(device)
        on_cuda = dev.type == "cuda"
        if compile == "on" and not on_cuda and cpp_compiler() is None:
            from histosynth.config import ConfigError
            raise ConfigError("train.compile", "'on' needs a C++ compiler on a CPU (torch.compile builds its "
                                               "kernels with one) and none was found ($CXX, c++, g++, clang++): "
                                               "install one, or choose 'auto' (compiled only where a compiler "
                                               "exists and it measures faster) or 'off'")
        cpu_fast = not on_cuda and cpu_fast_path and cpu_has_fast_bf16()
        if amp == "auto":
            amp = "bf16" if (on_cuda and torch.cuda.is_bf16_supported()) or cpu_fast else "off"
        cl = (on_cuda or cpu_fast) if channels_last == "auto" else channels_last == "on"
        return cls(dev, torch.bfloat16 if amp == "bf16" else None, cl, compiled=compile == "on")

    @classmethod
    def candidates(cls, device: str = "auto", amp: str = "auto", channels_last: str = "auto",
                   cpu_fast_path: bool = False, compile: str = "off") -> tuple["Runtime", ...]:
        """Every path the config's choices admit here, the rule's (:meth:`from_choices`) first. On
        CUDA, or with every key set, that is one path; on a CPU an ``auto`` key admits both of its
        values (bf16 only where the CPU computes it natively: emulated bf16 is ~20x slower;
        compiled only where a C++ compiler exists), and the engine measures them
        (:mod:`histosynth.autotune`: the compiled twin of the fastest eager path only)."""
        rule = cls.from_choices(device, amp, channels_last, cpu_fast_path, compile)
        if rule.device.type != "cpu":
            return (rule,)
        amps = [None, torch.bfloat16] if amp == "auto" and cpu_has_fast_bf16() else [rule.amp_dtype]
        layouts = [False, True] if channels_last == "auto" else [rule.channels_last]
        comps = [False, True] if compile == "auto" and cpp_compiler() is not None else [rule.compiled]
        return (rule, *(cls(rule.device, a, c, compiled=k) for k in comps for a in amps for c in layouts
                        if (a, c, k) != (rule.amp_dtype, rule.channels_last, rule.compiled)))

    def optimizer_options(self) -> dict:
        """Keyword arguments for Adam / AdamW: the fused kernel (every parameter in one pass) on
        CUDA and, from torch 2.4, on CPUs: the U-Net's AdamW step on 2 Zen 4 cores takes 9.8 ms
        instead of 36.7 (resnet18 U-Net, 14 M parameters; 0.26 s training steps)."""
        return {"fused": True} if self.fused_optimizers and (self.device.type == "cuda" or FUSED_ON_CPU) else {}

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        module = module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """Move a host batch to the device (pinned, non-blocking on CUDA) in the run's layout."""
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def describe(self) -> str:
        amp = {None: "fp32", torch.bfloat16: "bf16 autocast"}[self.amp_dtype]
        return (f"{self.device} | {amp} | {'channels_last' if self.channels_last else 'NCHW'}"
                + (" | compiled" if self.compiled else ""))
