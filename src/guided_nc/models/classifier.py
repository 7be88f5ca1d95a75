"""A backbone and a head as one module, and the free-feature "backbone" of the UFM.

:class:`Classifier` keeps the learnable head inside the module DDP wraps, so its gradient is
synchronised too. :func:`replace_classifier` builds one from a torchvision or timm classifier
(or any module whose last layer is a Linear), swapping its final Linear for a guided-nc head.
:class:`FreeFeatures` is the unconstrained feature model's backbone: the N x d features
themselves are the parameters and the input is the batch's sample indices, so a UFM run trains
through exactly the same step as a real network.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Classifier", "FreeFeatures", "replace_classifier"]

#: Attribute names of the final classifier in torchvision and timm models, tried in this order.
CLASSIFIER_ATTRIBUTES = ("fc", "classifier", "head", "heads")


class Classifier(nn.Module):
    """``head(backbone(inputs), labels)``: logits (B, K).

    Training mode needs the labels (B,) int64: the implicit head uses the batch's class means,
    and the model is the same for every head, so ``model(x)`` in training is an error whatever
    the head. Evaluation mode takes ``model(x)`` (labels are ignored).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, K) for inputs (B, ...); ``labels`` (B,) int64, required in training."""
        if labels is None and self.training:
            raise ValueError(
                "labels=None in training mode: a guided-nc classifier needs the batch's labels "
                "to train; call model(inputs, labels), or model.eval() to predict with "
                "model(inputs)"
            )
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


def replace_classifier(
    model: nn.Module, method: str, *, num_classes: int | None = None, **head_options
) -> Classifier:
    """Put a guided-nc head on a classifier in place of its final Linear layer.

    Finds the final classifier of

    * a timm model (it has ``reset_classifier`` and ``num_classes``): ``reset_classifier(0)``,
      so the model returns its pooled pre-logit features (as ``forward_head(pre_logits=True)``);
      d is ``head_hidden_size`` (or ``num_features``);
    * a torchvision model, or any module with an ``fc``, ``classifier``, ``head`` or ``heads``
      attribute that is an ``nn.Linear`` or a Sequential ending in one (ResNet ``fc``, VGG /
      EfficientNet ``classifier``, ViT ``heads``): that Linear becomes ``nn.Identity``;
    * any other module: its last registered ``nn.Linear`` becomes ``nn.Identity`` (true for
      Sequentials and for modules that register their layers in the order they run them).

    ``model`` is modified in place and becomes the backbone; d and K are taken from the removed
    Linear (``in_features``, ``out_features``).

    Args:
        model: the classifier.
        method: a head of :func:`guided_nc.heads.build_head` (``"standard"``, ``"fixed"``,
            ``"implicit"``, ...).
        num_classes: K of the new head (default: the removed classifier's).
        **head_options: options of :func:`guided_nc.heads.build_head` (``settings``,
            ``temperature``, ``validation``, ...).

    Returns:
        a :class:`Classifier`: ``model(x, labels)`` -> logits (B, K) in training,
        ``model(x)`` in evaluation; ``.backbone(x)`` are the (B, d) features the head takes.
    """
    from guided_nc.heads import build_head

    num_features, found_classes = _remove_final_linear(model)
    head = build_head(method, num_features, num_classes or found_classes, **head_options)
    return Classifier(model, head)


def _remove_final_linear(model: nn.Module) -> tuple[int, int]:
    """Strip ``model``'s final classifier in place; returns (d, K)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if callable(getattr(model, "reset_classifier", None)) and hasattr(model, "num_classes"):
        num_classes = int(model.num_classes)
        model.reset_classifier(0)
        width = getattr(model, "head_hidden_size", None) or model.num_features
        return int(width), num_classes
    for name in CLASSIFIER_ATTRIBUTES:
        layer = getattr(model, name, None)
        if isinstance(layer, nn.Linear):
            setattr(model, name, nn.Identity())
            return layer.in_features, layer.out_features
        if isinstance(layer, nn.Sequential) and len(layer) and isinstance(layer[-1], nn.Linear):
            last = layer[-1]
            layer[-1] = nn.Identity()
            return last.in_features, last.out_features
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears or linears[-1] == "":
        raise ValueError(
            f"model={type(model).__name__} has no final nn.Linear (nor an fc/classifier/head "
            "attribute, nor timm's reset_classifier); pass a classifier, or build "
            "Classifier(backbone, build_head(...)) yourself"
        )
    parent_name, _, child = linears[-1].rpartition(".")
    parent = model.get_submodule(parent_name)
    last = getattr(parent, child)
    setattr(parent, child, nn.Identity())
    return last.in_features, last.out_features
