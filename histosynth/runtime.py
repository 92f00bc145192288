"""Device, mixed precision and memory layout chosen once per run from the config."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


class NonFiniteLossError(RuntimeError):
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


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU; an explicit choice is checked."""
    return Runtime.from_choices(device, "off", "off").device


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None      # None: full fp32
    channels_last: bool

    @classmethod
    def from_choices(cls, device: str = "auto", amp: str = "auto", channels_last: str = "auto") -> "Runtime":
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("train.device is 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
        dev = torch.device(device)
        on_cuda = dev.type == "cuda"
        if amp == "auto":
            amp = "bf16" if on_cuda and torch.cuda.is_bf16_supported() else "off"
        cl = on_cuda if channels_last == "auto" else channels_last == "on"
        return cls(dev, torch.bfloat16 if amp == "bf16" else None, cl)

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
        return f"{self.device} | {amp} | {'channels_last' if self.channels_last else 'NCHW'}"
