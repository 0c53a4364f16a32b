"""Staged isomix ResNets: timm's ResNets whose same-shaped blocks share a template bank.

Paper: `Compositional Models: Multi-Task Learning and Knowledge Transfer with Modular Networks`
    - https://arxiv.org/abs/2107.10963 (Zhmoginov, Bashkirova, Sandler, 2021)

Each stage keeps its first block (stride and projection) as timm builds it. The stage's other
blocks, all of one shape, become its bank: K templates, K = that ResNet's blocks per stage minus
one, so the parameter count is the ResNet's plus the mixture logits. The stage executes
`reuse * K` layers, each a mixture of the templates (initially the cyclic order), so
`reuse=1` has the ResNet's depth and `reuse=2` twice its banked depth at the same parameters.
The pretrained tags load timm's ResNet weights through `resnet_to_isomix` (warm_start.py). Given ResNet weights
and no `reuse` or `order`, the model is built as the ResNet itself: one executed layer per template in
the hard identity order, so `create_model('isomix_resnet50', pretrained=True)` computes exactly what
timm's `resnet50.a1_in1k` computes. A deeper schedule over ResNet weights (`reuse=2`) is a starting
point for fine-tuning, and says so in a warning.
"""
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn

from timm.layers import DropPath, get_act_layer
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models._features import feature_take_indices  # timm.models exports no public name for it
from timm.models.resnet import BasicBlock, Bottleneck, downsample_conv

from ..bank import INIT_LOGIT, Mixture, Schedule, TemplateBank, cyclic_order
from ..blocks import BasicLayer, BottleneckLayer
from ._base import FeatureGetter, IsoMixModel, Order, base_cfg, normalize_order
from ._hub import pretrained_kwargs
from .routers import Router, TaskIds, build_router
from .warm_start import checkpoint_filter_fn, is_resnet_state_dict, resnet_to_isomix, warm_start_schedule

__all__ = ['IsoMixResNet', 'BankStage', 'is_resnet_state_dict', 'resnet_to_isomix', 'checkpoint_filter_fn']


def _per_stage_reuse(reuse: Union[int, Sequence[int]], num_stages: int) -> List[int]:
    reuses = [int(r) for r in reuse] if isinstance(reuse, (list, tuple)) else [int(reuse)] * num_stages
    if len(reuses) != num_stages or any(r < 1 for r in reuses):
        raise ValueError(f'reuse must be an integer >= 1 or one such integer per stage ({num_stages}), got {reuse}')
    return reuses


class BankStage(nn.Module):
    """A stage: its own first block, then a schedule of layers over the stage's template bank."""

    def __init__(
            self,
            first: nn.Module,
            bank: TemplateBank,
            schedule: Schedule,
            router: Optional[Router] = None,
    ):
        super().__init__()
        self.first = first
        self.bank = bank
        self.schedule = schedule
        self.router = router  # Routing Networks: picks the template of each layer per task or example
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, task: TaskIds = None) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            x = checkpoint(self.first, x)
        else:
            x = self.first(x)
        return self.schedule(x, self.bank, route=self.router.routes(x, task) if self.router is not None else None)


class IsoMixResNet(IsoMixModel):
    """ResNet (timm's default stem and blocks) with one template bank per stage."""

    classifier_name = 'fc'

    def __init__(
            self,
            block: str = 'bottleneck',
            layers: Tuple[int, ...] = (3, 4, 6, 3),
            reuse: Union[int, Sequence[int]] = 2,
            order: Order = None,
            temperature: float = 1.0,
            init_logit: float = INIT_LOGIT,
            mixture_init: str = 'cyclic',
            routing: Optional[str] = None,
            router: Optional[str] = None,
            num_tasks: int = 1,
            router_args: Optional[Dict[str, Any]] = None,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            channels: Tuple[int, ...] = (64, 128, 256, 512),
            act_layer: Union[str, Type[nn.Module]] = nn.ReLU,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            zero_init_last: bool = True,
            device=None,
            dtype=None,
    ):
        """
        Args:
            block: 'basic' (ResNet-18/34) or 'bottleneck' (ResNet-50/101).
            layers: blocks per stage in the source ResNet; stage i's bank has layers[i] - 1 templates.
            reuse: executed layers per template in each stage (1: the ResNet's depth), or one value per stage.
            order: hard orders, one list of template indices (or None for learnable logits) per stage.
            temperature: softmax temperature of the mixtures.
            init_logit: initial logit of each layer's scheduled template (cyclic order), the others 0.
            mixture_init: how the mixture logits start: 'cyclic', 'uniform' or 'random' (see bank.MIXTURE_INITS).
            num_classes: classifier outputs (0: no classifier).
            in_chans: input channels.
            global_pool: pooling type of the head.
            channels: base widths of the four stages.
            act_layer: activation.
            drop_rate: dropout before the classifier.
            drop_path_rate: stochastic depth, rising linearly over all executed blocks.
            zero_init_last: zero the last BN scale of every residual branch (templates too).
            routing, router, num_tasks, router_args: Routing Networks instead of mixtures, one router per
                stage (see IsoMixNet and models/routers.py); forward(x, task=...).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if block not in ('basic', 'bottleneck'):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        if any(n < 2 for n in layers):
            raise ValueError(f'every stage needs at least 2 blocks (a first block and at least one template), got {layers}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.drop_path_rate = drop_path_rate
        self.grad_checkpointing = False
        reuses = _per_stage_reuse(reuse, len(layers))
        act_layer = get_act_layer(act_layer)
        block_cls, expansion = (BasicBlock, 1) if block == 'basic' else (Bottleneck, 4)

        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(64, **dd)
        self.act1 = act_layer(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.feature_info = [dict(num_chs=64, reduction=2, module='act1')]

        orders = normalize_order(order, len(layers))
        inplanes, reduction = 64, 4
        stages = []
        for i, (n, planes) in enumerate(zip(layers, channels)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            outplanes = planes * expansion
            downsample = None
            if stride != 1 or inplanes != outplanes:
                downsample = downsample_conv(inplanes, outplanes, 1, stride=stride, **dd)
            first = block_cls(inplanes, planes, stride=stride, downsample=downsample, act_layer=act_layer, **dd)
            if block == 'basic':
                shapes = BasicLayer.template_shapes(outplanes)
                layer_fn = partial(BasicLayer, outplanes, act_layer=act_layer)
            else:
                shapes = BottleneckLayer.template_shapes(outplanes, planes)
                layer_fn = partial(BottleneckLayer, outplanes, planes, act_layer=act_layer)
            bank = TemplateBank(shapes, n - 1, **dd)
            num_layers = len(orders[i]) if orders[i] is not None else reuses[i] * (n - 1)
            stage_router = build_router(routing, router, num_layers, n - 1, outplanes, num_tasks,
                                        order, router_args, **dd)
            stage_order = cyclic_order(num_layers, n - 1) if stage_router is not None else orders[i]
            mixture = Mixture(num_layers, n - 1, order=stage_order, temperature=temperature, init_logit=init_logit,
                              init=mixture_init, **dd)
            schedule = Schedule(layer_fn, mixture, routed=stage_router is not None, **dd)
            stages.append(BankStage(first, bank, schedule, stage_router))
            inplanes = outplanes
            self.feature_info.append(dict(num_chs=outplanes, reduction=reduction, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self._set_drop_path()

        self.num_features = inplanes
        self._init_head(num_classes, global_pool, **dd)
        self.init_weights(zero_init_last=zero_init_last)

    def _set_drop_path(self) -> None:
        """Stochastic depth rising linearly over all executed blocks (first blocks included)."""
        depth = sum(1 + s.schedule.num_layers for s in self.stages)
        rates, i = [self.drop_path_rate * j / max(depth - 1, 1) for j in range(depth)], 0
        for stage in self.stages:
            stage.first.drop_path = DropPath(rates[i]) if rates[i] > 0 else None
            stage.schedule.set_drop_path(rates[i + 1:])
            i += 1 + stage.schedule.num_layers

    @torch.no_grad()
    def init_weights(self, zero_init_last: bool = True) -> None:
        """Every parameter and buffer: norms, classifier and mixture logits reset, then timm's ResNet init
        (He-normal fan-out convs, last BN scale 0 with `zero_init_last`) for the stem, the first blocks
        and every template of every bank."""
        self._reset_norms_classifier_and_mixtures()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        for stage in self.stages:
            if zero_init_last:
                stage.first.zero_init_last()
            first = stage.schedule.layers[0]
            layer_cls = type(first.per_template[0] if stage.schedule.routed else first)
            for k in range(stage.bank.num_templates):
                if stage.bank.weight.device.type != 'meta':
                    layer_cls.init_template(stage.bank.template(k), zero_init_last)
            if stage.router is not None:
                stage.router.reset_parameters()

    # --- schedule -------------------------------------------------------------------------
    def mixtures(self) -> Dict[str, Mixture]:
        """The mixture of every banked stage, by stage name (routed stages have none: their router chooses)."""
        return {f'stages.{i}': s.schedule.mixture for i, s in enumerate(self.stages) if s.router is None}

    def set_schedule(self, reuse: Optional[Union[int, Sequence[int]]] = None, order: Order = None) -> None:
        """Change depth (`reuse`, one value or one per stage) and/or set hard orders; templates are untouched.

        With `reuse`, every stage without a given order gets `reuse * K` layers in the cyclic order,
        as learnable logits. A stage's order may have any length (depth is free).
        """
        if any(s.router is not None for s in self.stages):
            raise ValueError('a routed model has no schedule to set: its routers choose the templates')
        reuses = _per_stage_reuse(reuse, len(self.stages)) if reuse is not None else None
        orders = normalize_order(order, len(self.stages))
        for i, (stage, stage_order) in enumerate(zip(self.stages, orders)):
            if stage_order is not None:
                stage.schedule.reschedule(order=stage_order)
            elif reuses is not None:
                stage.schedule.reschedule(num_layers=reuses[i] * stage.bank.num_templates)
        self._set_drop_path()
        self.set_grad_checkpointing(self.grad_checkpointing)

    def schedule_args(self) -> Dict[str, Any]:
        """Model kwargs (`reuse`, `order`) that rebuild the current schedule with create_model()."""
        reuse, order = [], []
        for stage in self.stages:
            m = stage.schedule.mixture
            reuse.append(max(m.num_layers // m.num_templates, 1))
            order.append(list(m.order) if m.is_hard and stage.router is None else None)
        args: Dict[str, Any] = dict(reuse=reuse[0] if len(set(reuse)) == 1 else reuse)
        if any(o is not None for o in order):
            args['order'] = order
        return args

    # --- timm model contract ------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^conv1|bn1|maxpool',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.first', (0,)),
                (r'^stages\.(\d+)\.(?:bank|schedule)', (1,)),
            ],
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Mixture logits and the banks' normalization scale/shift (1-D per template) get no weight decay."""
        return {'*.mixture.logits', '*.bank.affine', '*.router.*'}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable
            stage.schedule.grad_checkpointing = enable

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
        """Features of the stem (index 0) and of each stage (1..4); `norm` has no effect (no final norm);
        `task` as in forward()."""
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        stages = self.stages[:max_index] if stop_early else self.stages
        for i, stage in enumerate(stages):
            x = stage(x, task)
            if i + 1 in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last index kept (and the head)."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        self.stages = self.stages[:max_index]
        if max_index == 0:
            self.maxpool = nn.Identity()
        if max_index < len(self.feature_info) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            prune_head = True
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor, task: TaskIds = None) -> torch.Tensor:
        """`task`: a routed model's task (an int, or a tensor of ids per example; default 0)."""
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        if any(s.router is not None for s in self.stages):
            for stage in self.stages:
                x = stage(x, task)
            return x
        return self.stages(x)

    def forward(self, x: torch.Tensor, task: TaskIds = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, task))


def _create_isomix_resnet(variant: str, pretrained: bool = False, **kwargs) -> IsoMixResNet:
    return build_model_with_cfg(  # pretrained_kwargs: weights found and checked before timm loads them
        IsoMixResNet, variant, pretrained,
        feature_cfg=dict(feature_cls=FeatureGetter),  # layers reuse modules: features come from forward_intermediates
        **pretrained_kwargs(variant, pretrained, kwargs, filter_fn=checkpoint_filter_fn, kwargs_fn=warm_start_schedule),
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    return base_cfg(**{**dict(pool_size=(7, 7), interpolation='bilinear', first_conv='conv1', classifier='fc'), **kwargs})


def _warm_cfg(resnet_tag: str) -> Dict[str, Any]:
    """A tag whose weights are timm's published ResNet weights, converted on load."""
    src = get_pretrained_cfg(resnet_tag).to_dict()
    keep = ('input_size', 'pool_size', 'crop_pct', 'interpolation', 'mean', 'std', 'test_input_size',
            'test_crop_pct', 'license', 'origin_url')
    return _cfg(
        hf_hub_id=src['hf_hub_id'], **{k: src[k] for k in keep if src.get(k) is not None},
        notes=(f'timm {resnet_tag} weights, converted into templates (warm start)',),
    )


# the timm ResNet tags each isomix model can warm-start from
WARM_START_TAGS = {
    'isomix_resnet18': ('resnet18.a1_in1k', 'resnet18.tv_in1k'),
    'isomix_resnet26': ('resnet26.bt_in1k',),
    'isomix_resnet50': ('resnet50.a1_in1k', 'resnet50.tv2_in1k', 'resnet50.tv_in1k'),
    'isomix_resnet101': ('resnet101.a1h_in1k', 'resnet101.tv2_in1k'),
}

default_cfgs = generate_default_cfgs({
    **{
        f'{name}.{tag.split(".", 1)[1]}': _warm_cfg(tag)
        for name, tags in WARM_START_TAGS.items() for tag in tags
    },
})


@register_model
def isomix_resnet18(pretrained: bool = False, **kwargs) -> IsoMixResNet:
    """ResNet-18 with one bank per stage (K = 1, 1, 1, 1)."""
    model_args = dict(block='basic', layers=(2, 2, 2, 2))
    return _create_isomix_resnet('isomix_resnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def isomix_resnet26(pretrained: bool = False, **kwargs) -> IsoMixResNet:
    """ResNet-26 with one bank per stage (K = 1, 1, 1, 1)."""
    model_args = dict(block='bottleneck', layers=(2, 2, 2, 2))
    return _create_isomix_resnet('isomix_resnet26', pretrained, **dict(model_args, **kwargs))


@register_model
def isomix_resnet50(pretrained: bool = False, **kwargs) -> IsoMixResNet:
    """ResNet-50 with one bank per stage (K = 2, 3, 5, 2)."""
    model_args = dict(block='bottleneck', layers=(3, 4, 6, 3))
    return _create_isomix_resnet('isomix_resnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def isomix_resnet101(pretrained: bool = False, **kwargs) -> IsoMixResNet:
    """ResNet-101 with one bank per stage (K = 2, 3, 22, 2)."""
    model_args = dict(block='bottleneck', layers=(3, 4, 23, 3))
    return _create_isomix_resnet('isomix_resnet101', pretrained, **dict(model_args, **kwargs))
