"""EfficientNet classifiers (efficientnet-pytorch), from scratch or from a local weights file."""

from __future__ import annotations

from pathlib import Path

from efficientnet_pytorch import EfficientNet

from histosynth.checkpoint import CheckpointError, safe_load


def _unwrap(state: dict) -> dict:
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), dict):
            return state[key]
    return state


def create_classifier(variant: str, num_classes: int, weights: str | Path | None = None,
                      dropout: float = 0.2, bn_momentum: float = 0.1) -> EfficientNet:
    """``variant`` (efficientnet-b0 ...) with a ``num_classes`` head.

    ``weights``: a local state dict (ImageNet weights from efficientnet-pytorch's release, or a
    histosynth classifier checkpoint). Every backbone tensor must match; the head is loaded only
    when its class count matches, else it stays freshly initialised. Never downloads anything.
    ``bn_momentum`` is in PyTorch's convention (see ClassifierModelConfig.bn_momentum).
    """
    # efficientnet-pytorch passes 1 - batch_norm_momentum to torch's BatchNorm (TF convention)
    net = EfficientNet.from_name(variant, num_classes=num_classes, dropout_rate=dropout,
                                 batch_norm_momentum=1.0 - bn_momentum)
    if weights is None:
        return net
    if not Path(weights).is_file():
        raise CheckpointError(f"classifier weights not found: {weights} (histosynth never downloads "
                              "weights; point classifier.model.weights to a local state dict or null)")
    state = _unwrap(safe_load(weights))
    head = {k for k in state if k.startswith("_fc.")}
    if state.get("_fc.weight") is not None and state["_fc.weight"].shape[0] != num_classes:
        state = {k: v for k, v in state.items() if k not in head}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:           # a tensor of another shape: another variant
        first = str(e).strip().splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise CheckpointError(f"{weights} does not fit {variant}: {first}; is it a state dict of "
                              "this variant?") from None
    missing = [k for k in missing if not k.startswith("_fc.")]
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not fit {variant}: {len(missing)} missing and "
                              f"{len(unexpected)} unexpected tensors (e.g. {(missing + unexpected)[0]}); "
                              "is it a state dict of this variant?")
    return net
