"""Segmenters from segmentation-models-pytorch, from scratch or from weights that are already here."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from histosynth.checkpoint import CheckpointError, safe_load
from histosynth.config import ConfigError
from histosynth.runtime import Runtime
from histosynth.weights import WeightsNotCached, hf_cache_dir, offline_hub
from segmentation.config import SegmenterModelConfig


def unet_inference_runtime(device: str = "auto", amp: str = "auto", channels_last: str = "auto") -> Runtime:
    """The path a trained U-Net predicts whole images (or paints pairs) on: the training rule's
    precision (bf16 where the device computes it natively) and channels_last unless the config
    says ``off``. Unlike training steps, where the faster layout depends on the CPU and the decoder,
    inference was faster in channels_last wherever measured: 2 Zen 4 cores, fp32 held to AVX2,
    whole 1024 px image, resnet18 U-Net 1.51 -> 1.24 s (light decoder 1.13 -> 0.77 s); pix2pix
    painter at 256 px 106 -> 78 ms a pair (natively in fp32 94 -> 69 ms, bf16 32 ms)."""
    return Runtime.from_choices(device, amp, "on" if channels_last == "auto" else channels_last, cpu_fast_path=True)


def create_segmenter(cfg: SegmenterModelConfig, classes: int = 1) -> nn.Module:
    """``cfg.arch`` with ``cfg.encoder``; one logit map per class (1: binary). Encoder weights:
    None, ``imagenet`` (smp's own, from the Hugging Face cache only) or a local state dict."""
    import segmentation_models_pytorch as smp

    w = cfg.encoder_weights
    try:
        with offline_hub():
            widths = {} if cfg.decoder_channels is None else {"decoder_channels": tuple(cfg.decoder_channels)}
            net = smp.create_model(cfg.arch, encoder_name=cfg.encoder, encoder_weights="imagenet" if w == "imagenet" else None,
                                   in_channels=3, classes=classes, **widths)
    except KeyError as e:
        raise ConfigError("downstream.model.encoder", f"{e}; see segmentation_models_pytorch.encoders") from None
    except Exception as e:             # not in the cache (offline): say where it goes and how to get it
        if w != "imagenet":
            raise
        raise WeightsNotCached(f"ImageNet weights of the {cfg.encoder} encoder are not in the Hugging Face cache "
                               f"({hf_cache_dir()}; {type(e).__name__}); fetch them once where there is network "
                               f"with python -c \"import segmentation_models_pytorch as smp; smp.Unet('{cfg.encoder}')\", "
                               "or set downstream.model.encoder_weights to a local file or null") from None
    if w not in (None, "imagenet"):
        if not Path(w).is_file():
            raise CheckpointError(f"encoder weights not found: {w} (nothing is downloaded; give a local file, "
                                  "imagenet, or null)")
        state = safe_load(w)
        state = state.get("state_dict", state) if isinstance(state.get("state_dict"), dict) else state
        state = {k.removeprefix("encoder."): v for k, v in state.items()}
        missing, _ = net.encoder.load_state_dict(state, strict=False)
        if not state or len(missing) > len(state):
            raise CheckpointError(f"{w} does not fit the {cfg.encoder} encoder ({len(missing)} missing tensors)")
    return net
