"""Weight initialisation shared by the built-in architectures."""

from __future__ import annotations

from torch import nn


def init_weights(model: nn.Module, linear_std: float | None = None) -> None:
    """Kaiming-normal convs and unit BN so every builtin starts from the same, well-known recipe.

    ``linear_std`` switches Linear layers to normal(0, std) with zero bias (VGG's recipe);
    otherwise they keep PyTorch's default initialisation.
    """
    if any(p.is_meta for p in model.parameters()):
        # A shape check on the meta device (registry.runs_on) has no values to draw, and drawing them there
        # first imports torch's reference kernels: over a second for every command that builds a model.
        return
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and linear_std is not None:
            nn.init.normal_(module.weight, 0.0, linear_std)
            nn.init.zeros_(module.bias)


def init_transformer_weights(model: nn.Module, embeddings: tuple[nn.Parameter, ...] = ()) -> None:
    """Truncated-normal (std 0.02) Linear, conv and embedding weights, zero biases, unit LayerNorm: the ViT recipe."""
    if any(p.is_meta for p in model.parameters()):
        return  # see init_weights: a shape check on the meta device draws nothing
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for p in embeddings:
        nn.init.trunc_normal_(p, std=0.02)
