"""Layer variants of decoder-only models: drop some decoder layers, or keep the first N."""

import json
from pathlib import Path

from loraforge.errors import ModelError


def decoder_layers(model):
    """The ModuleList of decoder layers of a llama-style model (llama, qwen2/3, mistral, phi3, ...)."""
    import torch

    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelError(
            f"{type(model).__name__} has no .model.layers list of decoder layers; layer variants support "
            "llama-style decoders (llama, qwen2, qwen3, mistral, phi3); set model.variant: original"
        )
    return base, layers


def kept_layers(count: int, variant: str, drop_layers: list[int], keep_layers: int | None) -> list[int]:
    """The indices of the `count` decoder layers that the variant keeps; ModelError where it cannot apply. Checked
    from the model's config.json before any data is prepared, and again on the loaded layers."""
    if variant == "original":
        return list(range(count))
    if variant == "drop_layers":
        bad = [i for i in drop_layers if not -count <= i < count]
        if bad:
            raise ModelError(f"model.drop_layers {bad} out of range: the model has {count} layers (0..{count - 1})")
        dropped = {i % count for i in drop_layers}
        keep = [i for i in range(count) if i not in dropped]
    else:
        if keep_layers > count:
            raise ModelError(f"model.keep_layers={keep_layers} but the model has only {count} layers")
        keep = list(range(keep_layers))
    if not keep:
        raise ModelError("the variant removes every decoder layer; keep at least one")
    return keep


def configured_layers(folder: Path) -> int | None:
    """num_hidden_layers of a model folder's config.json; None where the file or the key is not there."""
    try:
        settings = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    count = settings.get("num_hidden_layers") if isinstance(settings, dict) else None
    return count if isinstance(count, int) else None


def apply_variant(model, variant: str, drop_layers: list[int], keep_layers: int | None):
    """Remove decoder layers in place and renumber the rest so the KV cache, config and saving agree."""
    if variant == "original":
        return model
    import torch

    base, layers = decoder_layers(model)
    count = len(layers)
    keep = kept_layers(count, variant, drop_layers, keep_layers)
    base.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new_index, layer in enumerate(base.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = model.config
    config.num_hidden_layers = len(keep)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(layer_types) == count:
        config.layer_types = [layer_types[i] for i in keep]
    return model
