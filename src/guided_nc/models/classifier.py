"""A backbone and a head as one module, and the free-feature "backbone" of the UFM.

:class:`Classifier` keeps the learnable head inside the module DDP wraps, so its gradient is
synchronised too. :class:`FreeFeatures` is the unconstrained feature model's backbone: the N x d
features themselves are the parameters and the input is the batch's sample indices, so a UFM run
trains through exactly the same step as a real network.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Classifier", "FreeFeatures"]


class Classifier(nn.Module):
    """``head(backbone(inputs), labels)``: logits (B, K).

    The implicit head needs the labels in training (class means of the batch); every head
    ignores them in evaluation.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.backbone(inputs), labels)

    def features_and_logits(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's normalised features (B, d) and its logits (B, K), in evaluation order.

        What the neural-collapse metrics measure: the features the head itself classifies.
        """
        features = self.backbone(inputs)
        return self.head.normalize(features), self.head(features)


class FreeFeatures(nn.Module):
    """N free features of width d, trained as parameters (the unconstrained feature model).

    ``forward(index)`` returns the rows ``index`` (a (B,) int64 tensor), or all N rows for
    ``None``. The parameter is one (N, d) tensor, which AGD treats as a weight (scale
    ``sqrt(N/d)``), as the paper's UFM does.

    Args:
        features: the initial (N, d) features; copied into the parameter.
    """

    def __init__(self, features: torch.Tensor) -> None:
        super().__init__()
        if not isinstance(features, torch.Tensor) or features.dim() != 2:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else features
            raise ValueError(f"features must be an (N, d) tensor, got {shape}")
        self.features = nn.Parameter(features.detach().clone())
        self.num_features = features.shape[1]

    def forward(self, index: torch.Tensor | None = None) -> torch.Tensor:
        return self.features if index is None else self.features[index]

    def extra_repr(self) -> str:
        return f"num_samples={self.features.shape[0]}, num_features={self.num_features}"
