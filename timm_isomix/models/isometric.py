"""Isometric isomix nets: the trunk of "Compositional Models" (Zhmoginov, Bashkirova, Sandler, 2021).

Paper: https://arxiv.org/abs/2107.10963

A patchifying stem (conv with kernel = stride = patch size, BN, act) brings the image to a
constant width and resolution; then one bank of K residual templates (timm's BasicBlock shape)
and L executed layers, each a mixture of the templates. L and the order are free at a fixed
parameter count. Variants are named `isomix_iso_<width>_<depth>_p<patch>`; K = depth / 2.
"""
from collections import OrderedDict
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn

from timm.layers import get_act_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices  # timm.models exports no public name for it

from ..bank import INIT_LOGIT, Mixture, Schedule, TemplateBank, cyclic_order
from ..blocks import BasicLayer
from ._base import FeatureGetter, IsoMixModel, Order, base_cfg, normalize_order
from ._hub import pretrained_kwargs, published_cfg
from .routers import TaskIds, build_router

__all__ = ['IsoMixNet']


class IsoMixNet(IsoMixModel):
    """Patch stem, then L layers over one bank of K BasicBlock templates at constant width."""

    def __init__(
            self,
            width: int = 256,
            depth: int = 16,
            num_templates: int = 8,
            patch_size: int = 2,
            reuse: Optional[int] = None,
            order: Order = None,
            temperature: float = 1.0,
            init_logit: float = INIT_LOGIT,
            mixture_init: str = 'random',
            routing: Optional[str] = None,
            router: Optional[str] = None,
            num_tasks: int = 1,
            router_args: Optional[Dict[str, Any]] = None,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            act_layer: Union[str, Type[nn.Module]] = nn.ReLU,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            zero_init_last: bool = True,
            device=None,
            dtype=None,
    ):
        """
        Args:
            width: channels of the trunk.
            depth: executed layers L (ignored when `reuse` or `order` is given).
            num_templates: templates K in the bank.
            patch_size: kernel and stride of the stem.
            reuse: executed layers per template, L = reuse * K, in the cyclic order.
            order: a hard order, one template index per executed layer (L = its length).
            temperature: softmax temperature of the mixture.
            init_logit: initial logit of each layer's scheduled template (cyclic order), the others 0.
            mixture_init: how the mixture logits start: 'random' (default: U(0, 1), the authors' start; the
                mixture-dynamics study found no accuracy cost and only non-cyclic starts let mixtures move),
                'uniform' or 'cyclic' (see bank.MIXTURE_INITS).
            routing: Routing Networks instead of a mixture: 'task' (a route per task) or 'input' (per example);
                see models/routers.py. `router`: 'reinforce' (default), 'wpl' or 'gumbel'; `num_tasks`: tasks the
                router tells apart (forward(x, task=...)); `router_args`: reward, cost, collab, tau, tau_end, hidden, embed.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if reuse is not None:
            if int(reuse) < 1:
                raise ValueError(f'reuse must be at least 1 (executed layers per template), got {reuse}')
            depth = int(reuse) * num_templates
        order = normalize_order(order, 1)[0]
        if order is not None:
            depth = len(order)
        self.router = build_router(routing, router, depth, num_templates, width, num_tasks, order, router_args, **dd)
        if self.router is not None:
            order = cyclic_order(depth, num_templates)  # templates run as they are; the router picks which
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.drop_path_rate = drop_path_rate
        self.patch_size = patch_size
        self.grad_checkpointing = False
        act_layer = get_act_layer(act_layer)

        self.stem = nn.Sequential(OrderedDict([
            ('conv', nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size, bias=False, **dd)),
            ('bn', nn.BatchNorm2d(width, **dd)),
            ('act', act_layer(inplace=True)),
        ]))
        self.bank = TemplateBank(BasicLayer.template_shapes(width), num_templates, **dd)
        mixture = Mixture(depth, num_templates, order=order, temperature=temperature, init_logit=init_logit,
                          init=mixture_init, **dd)
        self.schedule = Schedule(partial(BasicLayer, width, act_layer=act_layer), mixture,
                                 routed=self.router is not None, **dd)
        self._update_depth()

        self.num_features = width
        self._init_head(num_classes, global_pool, **dd)
        self.init_weights(zero_init_last=zero_init_last)

    def _update_depth(self) -> None:
        """Drop-path rates and feature_info follow the number of executed layers."""
        n = self.schedule.num_layers
        self.schedule.set_drop_path([self.drop_path_rate * l / max(n - 1, 1) for l in range(n)])
        self.feature_info = [
            dict(num_chs=self.bank.layout['conv1.weight'][2][0], reduction=self.patch_size,
                 module=f'schedule.layers.{l}')
            for l in range(n)]

    @torch.no_grad()
    def init_weights(self, zero_init_last: bool = True) -> None:
        """Every parameter and buffer: norms, classifier and mixture logits reset, the stem conv He-normal (fan-out),
        every template as timm initialises a BasicBlock (its last BN scale 0 with `zero_init_last`)."""
        self._reset_norms_classifier_and_mixtures()
        nn.init.kaiming_normal_(self.stem.conv.weight, mode='fan_out', nonlinearity='relu')
        if self.bank.weight.device.type != 'meta':
            for k in range(self.bank.num_templates):
                BasicLayer.init_template(self.bank.template(k), zero_init_last)
        if self.router is not None:
            self.router.reset_parameters()

    # --- schedule -------------------------------------------------------------------------
    def mixtures(self) -> Dict[str, Mixture]:
        """The schedule's mixture; none for a routed model (its router chooses the templates, see route usage)."""
        return {'schedule': self.schedule.mixture} if self.router is None else {}

    def set_schedule(self, reuse: Optional[int] = None, order: Order = None, depth: Optional[int] = None) -> None:
        """Change depth (`reuse` * K or `depth` layers, cyclic learnable logits) or set a hard order."""
        if self.router is not None:
            raise ValueError('a routed model has no schedule to set: its router chooses the templates')
        order = normalize_order(order, 1)[0]
        if reuse is not None:
            if int(reuse) < 1:
                raise ValueError(f'reuse must be at least 1 (executed layers per template), got {reuse}')
            depth = int(reuse) * self.bank.num_templates
        if order is not None:
            self.schedule.reschedule(order=order)
        elif depth is not None:
            self.schedule.reschedule(num_layers=depth)
        self._update_depth()

    def schedule_args(self) -> Dict[str, Any]:
        """Model kwargs (`depth` or `order`) that rebuild the current schedule with create_model()."""
        m = self.schedule.mixture
        return dict(order=list(m.order)) if m.is_hard and self.router is None else dict(depth=m.num_layers)

    # --- timm model contract ------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^stem', blocks=r'^bank|^schedule' if coarse else [
            (r'^bank', (0,)), (r'^schedule\.layers\.(\d+)', None), (r'^schedule\.mixture|^router', (99999,))])

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'schedule.mixture.logits', 'bank.affine', 'router.*'}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self.schedule.grad_checkpointing = enable

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            task: TaskIds = None,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Outputs of the executed layers; `norm` has no effect (no final norm); `task` as in forward()."""
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        x = self.stem(x)
        x, intermediates = self.schedule(
            x, self.bank, take=take_indices, end=max_index + 1 if stop_early else None, route=self._route(x, task))
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the executed layers after the last index kept (and the head)."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        self.schedule.truncate(max_index + 1)
        if self.router is not None:
            self.router.truncate(max_index + 1)
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def _route(self, x: torch.Tensor, task: TaskIds):
        return self.router.routes(x, task) if self.router is not None else None

    def forward_features(self, x: torch.Tensor, task: TaskIds = None) -> torch.Tensor:
        """`task`: a routed model's task (an int, or a tensor of ids per example; default 0)."""
        x = self.stem(x)
        return self.schedule(x, self.bank, route=self._route(x, task))

    def forward(self, x: torch.Tensor, task: TaskIds = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, task))


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: IsoMixNet) -> Dict[str, torch.Tensor]:
    """Pretrained weights: a train.py checkpoint's 'state_dict' or a plain isomix state dict."""
    return state_dict.get('state_dict', state_dict)


def _create_isomix_iso(variant: str, pretrained: bool = False, **kwargs) -> IsoMixNet:
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        IsoMixNet, variant, pretrained,
        feature_cfg=dict(out_indices=out_indices, feature_cls=FeatureGetter),
        **pretrained_kwargs(variant, pretrained, kwargs, filter_fn=checkpoint_filter_fn),  # _hub.py: weights found, checked
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    return base_cfg(**{**dict(pool_size=(16, 16), interpolation='bicubic', first_conv='stem.conv', classifier='head'), **kwargs})


CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_cfg32 = partial(_cfg, num_classes=10, input_size=(3, 32, 32), pool_size=(16, 16), crop_pct=1.0)

default_cfgs = generate_default_cfgs({
    'isomix_iso_64_8_p2': _cfg32(),
    'isomix_iso_128_16_p2': _cfg32(),
    'isomix_iso_192_12_p14': _cfg(),
    'isomix_iso_256_16_p14': _cfg(),
    # published tags (`timm_isomix.hub.publish` to $TIMM_ISOMIX_HUB_ORG, see _hub.py); the default org's files
    # ship in timm_isomix/weights/ (recipes: hparams/isomix_iso_64_8_p4_*.yaml; top-1: README, Models);
    # the first tag is the model's default, as in timm
    'isomix_iso_64_8_p4.cifar10': published_cfg('isomix_iso_64_8_p4', 'cifar10', _cfg32(
        pool_size=(8, 8), mean=CIFAR10_MEAN, std=CIFAR10_STD)),
    'isomix_iso_64_8_p4.miniimagenet32': published_cfg('isomix_iso_64_8_p4', 'miniimagenet32', _cfg32(
        pool_size=(8, 8), num_classes=100)),
})


@register_model
def isomix_iso_64_8_p2(pretrained: bool = False, **kwargs) -> IsoMixNet:
    """32 px inputs: width 64, 8 layers over 4 templates, 16x16 tokens."""
    model_args = dict(width=64, depth=8, num_templates=4, patch_size=2)
    return _create_isomix_iso('isomix_iso_64_8_p2', pretrained, **dict(model_args, **kwargs))


@register_model
def isomix_iso_64_8_p4(pretrained: bool = False, **kwargs) -> IsoMixNet:
    """32 px inputs: width 64, 8 layers over 4 templates, 8x8 tokens (the trunk of the studies, 4x cheaper)."""
    model_args = dict(width=64, depth=8, num_templates=4, patch_size=4)
    return _create_isomix_iso('isomix_iso_64_8_p4', pretrained, **dict(model_args, **kwargs))


@register_model
def isomix_iso_128_16_p2(pretrained: bool = False, **kwargs) -> IsoMixNet:
    """32 px inputs: width 128, 16 layers over 8 templates, 16x16 tokens."""
    model_args = dict(width=128, depth=16, num_templates=8, patch_size=2)
    return _create_isomix_iso('isomix_iso_128_16_p2', pretrained, **dict(model_args, **kwargs))


@register_model
def isomix_iso_192_12_p14(pretrained: bool = False, **kwargs) -> IsoMixNet:
    """224 px inputs: width 192, 12 layers over 6 templates, 16x16 tokens."""
    model_args = dict(width=192, depth=12, num_templates=6, patch_size=14)
    return _create_isomix_iso('isomix_iso_192_12_p14', pretrained, **dict(model_args, **kwargs))


@register_model
def isomix_iso_256_16_p14(pretrained: bool = False, **kwargs) -> IsoMixNet:
    """224 px inputs: width 256, 16 layers over 8 templates, 16x16 tokens."""
    model_args = dict(width=256, depth=16, num_templates=8, patch_size=14)
    return _create_isomix_iso('isomix_iso_256_16_p14', pretrained, **dict(model_args, **kwargs))
