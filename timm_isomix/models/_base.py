"""What both isomix families share: timm's classifier contract, the order argument, the base cfg.

A family subclasses `IsoMixModel`, sets `classifier_name` ('fc' or 'head'), and provides
`forward_features`, `mixtures` and `set_schedule`. The head (pool, dropout, classifier) is built,
reset and run here, as timm's models do.
"""
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import create_classifier
from timm.models._features import FeatureGetterNet  # timm.models exports no public name for it

from ..bank import Mixture

__all__ = ['IsoMixModel', 'FeatureGetter', 'Order', 'normalize_order', 'base_cfg', 'PAPER_ID']

# Zhmoginov, Bashkirova, Sandler, "Compositional Models: Multi-Task Learning and Knowledge Transfer with
# Modular Networks", 2021 (ICLR 2021 submission, OpenReview paUVOwaXTAR)
PAPER_ID = 'arXiv:2107.10963'

Order = Optional[Union[Sequence[Optional[Sequence[int]]], Dict[int, Sequence[int]]]]


def normalize_order(order: Order, num_banks: int) -> List[Optional[List[int]]]:
    """One entry per bank: a list of template indices (a hard order) or None (learnable mixture).

    Accepts a list with one entry per bank, a dict {bank index: order}, or, for one bank, a flat list.
    """
    if order is None:
        return [None] * num_banks
    if isinstance(order, dict):
        bad = [k for k in order if not isinstance(k, int) or not 0 <= k < num_banks]
        if bad:
            raise ValueError(f'order given for stages {bad}, but this model has banked stages 0..{num_banks - 1}')
        return [list(order[i]) if order.get(i) is not None else None for i in range(num_banks)]
    order = list(order)
    if num_banks == 1 and order and all(isinstance(k, int) for k in order):
        return [order]
    if len(order) != num_banks:
        raise ValueError(
            f'order has {len(order)} entries but this model has {num_banks} banked stages; give one list of '
            f'template indices (or None) per stage, or a dict {{stage: [indices]}}')
    return [list(o) if o is not None else None for o in order]


def base_cfg(**kwargs) -> Dict[str, Any]:
    """The pretrained cfg fields every isomix model shares (ImageNet normalisation, license, paper)."""
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'crop_pct': 0.875,
        'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225),
        'license': 'apache-2.0', 'paper_ids': PAPER_ID,
        **kwargs,
    }


class FeatureGetter(FeatureGetterNet):
    """The `features_only` wrapper of isomix models: timm's FeatureGetterNet (features from
    forward_intermediates, since executed layers reuse the bank's modules), plus `set_grad_checkpointing`,
    which timm 1.0.31's lacks and detection / segmentation pipelines call on their backbones."""

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


class IsoMixModel(nn.Module):
    """timm's classifier contract for a model with `num_features`, `global_pool`, `drop_rate` and a classifier."""

    classifier_name = 'head'
    num_classes: int
    num_features: int
    drop_rate: float
    # global_pool (a timm SelectAdaptivePool2d) is set by _init_head; not annotated here, since TorchScript
    # reads class annotations and rejects nn.Module as one, failing before it reaches the actual reason

    def _init_head(self, num_classes: int, global_pool: str, device=None, dtype=None) -> None:
        self.num_classes = num_classes
        self.global_pool, classifier = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, device=device, dtype=dtype)
        setattr(self, self.classifier_name, classifier)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    def mixtures(self) -> Dict[str, Mixture]:
        """The mixture of every bank, by name."""
        raise NotImplementedError

    @torch.no_grad()
    def _reset_norms_classifier_and_mixtures(self) -> None:
        """Every BatchNorm (scale 1, shift 0, statistics reset), the classifier (torch's Linear init) and every
        mixture (its initial logits). With the family's conv and template init, `init_weights()` then sets every
        parameter and buffer, so a model built on the meta device, moved with `to_empty()`, becomes a whole model."""
        for m in self.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.Linear, Mixture)):
                m.reset_parameters()

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return self.classifier_name if name_only else getattr(self, self.classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        weight = next(self.parameters())  # the new head on the model's device and dtype
        self._init_head(num_classes, global_pool, device=weight.device, dtype=weight.dtype)
        self.global_pool.train(self.training)
        getattr(self, self.classifier_name).train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else getattr(self, self.classifier_name)(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
