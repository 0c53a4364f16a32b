"""Template banks, mixtures and schedules: the whole method of "Compositional Models"
(Zhmoginov, Bashkirova, Sandler, 2021, arXiv:2107.10963).

A `TemplateBank` stacks K templates of one block type. A `Mixture` owns, for each executed
layer l, K logits and turns them into that layer's parameters,
    theta_l = sum_k alpha_lk * T_k,  alpha_l = softmax(logits_l / temperature),
with one matrix product per bank for all layers. A hard order (one template index per layer)
runs each template as it is, with no mixing. A `Schedule` is a mixture plus the executed layers,
each owning its normalization statistics. Any number of schedules (tasks, domains) can run over
one bank: the bank is passed in at call time, never copied. A router (Routing Networks,
models/routers.py) can replace a hard order's choice with a template per example (`run_routed`).
"""
import math
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from timm.layers import DropPath, register_notrace_module

from .blocks import no_autocast, run_mixed, straight_through_gate

__all__ = ['TemplateBank', 'Mixture', 'Schedule', 'RoutedLayer', 'run_routed', 'cyclic_order', 'order_logits',
           'INIT_LOGIT', 'SHARP_LOGIT', 'MIXTURE_INITS']

# Initial logit of a layer's scheduled template (the others start at 0): alpha is 0.98 on it for K=2, 0.93 for
# K=5. Sharp enough that each template first learns a role of its own, soft enough that the softmax gradient is
# alive and the mixtures can move (at a logit of 16 it saturates). A warm start sets SHARP_LOGIT instead.
INIT_LOGIT = 4.0
# The logit (times the temperature) that stands for "this layer runs this template": alpha is one-hot to
# ~1e-7 per other template, so the layer computes what the template computes to float32 precision.
# Used by warm starts and when a hard order becomes learnable logits (Schedule.reschedule).
SHARP_LOGIT = 16.0
# How a mixture's logits start: 'cyclic' (INIT_LOGIT, or `init_logit`, on layer l's template l mod K, 0 on the
# others), 'uniform' (all templates equal, plus N(0, 0.01^2) noise), 'random' (U(0, 1) per logit, as the
# authors' reference code starts its single-task mixtures).
MIXTURE_INITS = ('cyclic', 'uniform', 'random')
UNIFORM_NOISE = 0.01


def cyclic_order(num_layers: int, num_templates: int) -> List[int]:
    """Layer l runs template l mod K: with num_layers = reuse * K, each template runs `reuse` times."""
    return [l % num_templates for l in range(num_layers)]


def order_logits(order: Sequence[int], num_templates: int, logit: float) -> torch.Tensor:
    """Logits (L, K): `logit` on each layer's template in `order`, 0 on the others."""
    logits = torch.zeros(len(order), num_templates)
    logits[torch.arange(len(order)), torch.tensor(list(order), dtype=torch.long)] = logit
    return logits


class TemplateBank(nn.Module):
    """K templates of one block type, stored as two stacked parameters of shape (K, P).

    `weight` holds the multi-dimensional parameters (conv kernels: weight decay applies),
    `affine` the one-dimensional ones (normalization scale and shift: no weight decay).
    Keeping every template parameter in one row makes the mixing a single matrix product.
    """

    def __init__(self, shapes: Dict[str, Tuple[int, ...]], num_templates: int, device=None, dtype=None):
        super().__init__()
        if num_templates < 1:
            raise ValueError(f'a template bank needs at least one template, got num_templates={num_templates}')
        self.num_templates = num_templates
        self.layout: Dict[str, Tuple[str, int, Tuple[int, ...]]] = {}  # name -> (group, index in group, shape)
        sizes: Dict[str, List[int]] = {'weight': [], 'affine': []}
        for name, shape in shapes.items():
            group = 'weight' if len(shape) > 1 else 'affine'
            self.layout[name] = (group, len(sizes[group]), tuple(shape))
            sizes[group].append(math.prod(shape))
        self.sizes = sizes
        self.weight = nn.Parameter(torch.empty(num_templates, sum(sizes['weight']), device=device, dtype=dtype))
        self.affine = nn.Parameter(torch.empty(num_templates, sum(sizes['affine']), device=device, dtype=dtype))

    def unflatten(self, weight_row: torch.Tensor, affine_row: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One layer's parameters, by name, as views into one row of (mixed) templates."""
        return self.unflatten_rows(weight_row, affine_row, 1)[0]

    def unflatten_rows(self, weight: torch.Tensor, affine: torch.Tensor, n: int) -> List[Dict[str, torch.Tensor]]:
        """Every row's parameters, by name, as views into (R, P) rows: one split per group for all rows,
        so autograd gathers all their gradients with one concatenation (per-row splits would cost a
        concatenation per row and then a stack)."""
        # n is given, not read from weight.shape: under FX tracing the shape of a mixed tensor is not a number
        parts = {
            'weight': weight.reshape(-1).split(self.sizes['weight'] * n),
            'affine': affine.reshape(-1).split(self.sizes['affine'] * n),
        }
        per_row = {group: len(sizes) for group, sizes in self.sizes.items()}
        return [
            {name: parts[group][r * per_row[group] + i].view(shape) for name, (group, i, shape) in self.layout.items()}
            for r in range(n)]

    def template(self, k: int) -> Dict[str, torch.Tensor]:
        """Template k's parameters by name, as views (writable, e.g. to initialise or warm-start it)."""
        return self.unflatten(self.weight[k], self.affine[k])

    def extra_repr(self) -> str:
        return f'num_templates={self.num_templates}, params_per_template={self.weight.shape[1] + self.affine.shape[1]}'


@register_notrace_module  # FX keeps it a leaf: its eval cache is Python state, not graph ops
class Mixture(nn.Module):
    """How the layers of a schedule draw on a bank: learnable logits (L, K) or a hard order.

    Called with the bank's stacked parameters, it returns the rows the layers run and
    `rows()` says which row each layer takes: soft mixtures return (L, P) mixed rows (row l for
    layer l); a hard order returns the bank itself (row order[l] for layer l), so nothing is mixed.
    In eval mode without autograd, the mixed rows are computed once and kept until a parameter
    changes (in-place update, load, dtype or device), or the module returns to training.
    """

    def __init__(
            self,
            num_layers: int,
            num_templates: int,
            order: Optional[Sequence[int]] = None,
            temperature: float = 1.0,
            init_logit: float = INIT_LOGIT,
            init: str = 'cyclic',
            device=None,
            dtype=None,
    ):
        super().__init__()
        if init not in MIXTURE_INITS:
            raise ValueError(f'unknown mixture init {init!r}; expected one of {MIXTURE_INITS}')
        if num_layers < 1:
            raise ValueError(f'a schedule needs at least one layer, got num_layers={num_layers}')
        if num_templates < 1:
            raise ValueError(f'a mixture needs at least one template, got num_templates={num_templates}')
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f'temperature must be a positive finite number, got {temperature}')
        self.num_layers, self.num_templates, self.temperature = num_layers, num_templates, float(temperature)
        self.init, self.init_logit = init, float(init_logit)
        self._cache: Optional[Tuple[tuple, Tuple[torch.Tensor, torch.Tensor]]] = None
        if order is not None:
            order = [int(k) for k in order]
            if len(order) != num_layers:
                raise ValueError(f'an order needs one template index per layer: got {len(order)} for {num_layers} layers')
            bad = [k for k in order if not 0 <= k < num_templates]
            if bad:
                raise ValueError(f'order {order} names templates {bad} outside the bank (valid: 0..{num_templates - 1})')
            self.order: Optional[Tuple[int, ...]] = tuple(order)
            self.register_parameter('logits', None)
        else:
            self.order = None
            self.logits = nn.Parameter(torch.empty(num_layers, num_templates, device=device, dtype=dtype))
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Logits as `init` says (see MIXTURE_INITS); a hard order has none."""
        if self.logits is None or self.logits.device.type == 'meta':
            return
        if self.init == 'cyclic':
            logits = order_logits(cyclic_order(self.num_layers, self.num_templates), self.num_templates, self.init_logit)
        elif self.init == 'uniform':
            logits = torch.randn(self.num_layers, self.num_templates) * UNIFORM_NOISE
        else:
            logits = torch.rand(self.num_layers, self.num_templates)
        self.logits.copy_(logits)
        self._cache = None

    @property
    def is_hard(self) -> bool:
        return self.order is not None

    def rows(self) -> Tuple[int, ...]:
        """Which row of forward()'s output each layer runs."""
        return self.order if self.order is not None else tuple(range(self.num_layers))

    def alpha(self) -> torch.Tensor:
        """Mixture weights (L, K); one-hot rows for a hard order."""
        if self.order is not None:
            return F.one_hot(torch.tensor(self.order), self.num_templates).float()
        return torch.softmax(self.logits.float() / self.temperature, dim=-1)

    def argmax_order(self) -> List[int]:
        """The template each layer leans on most: the hard order closest to this mixture."""
        return self.alpha().argmax(-1).tolist()

    def forward(self, weight: torch.Tensor, affine: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.order is not None:
            return weight, affine
        cacheable = not self.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if not cacheable:
            self._cache = None
            return self._mix(weight, affine)
        key = tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in (weight, affine, self.logits))
        key += (torch.is_inference_mode_enabled(),)
        if self._cache is None or self._cache[0] != key:
            if self.logits.device.type != 'meta' and not torch.isfinite(self.logits).all():
                raise ValueError(f'mixture logits are not finite: {self.logits.tolist()}')
            self._cache = (key, self._mix(weight, affine))
        return self._cache[1]

    def _mix(self, weight: torch.Tensor, affine: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # in the bank's precision even under autocast: the rows are parameters, which autocast casts where they
        # are used (a conv), and normalization takes its scale and shift in float32
        with no_autocast(weight.device.type):
            alpha = torch.softmax(self.logits / self.temperature, dim=-1).to(weight.dtype)
            return alpha @ weight, alpha @ affine

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        logits = state_dict.get(prefix + 'logits')
        if logits is not None and logits.device.type != 'meta' and not torch.isfinite(logits).all():
            raise ValueError(f'checkpoint holds non-finite mixture logits at {prefix}logits: {logits.tolist()}')
        self._cache = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self):  # deepcopy / pickle: the cache is derived state
        return {**self.__dict__, '_cache': None}

    def extra_repr(self) -> str:
        kind = f'order={list(self.order)}' if self.order is not None else f'temperature={self.temperature}'
        return f'num_layers={self.num_layers}, num_templates={self.num_templates}, {kind}'


def _scheduled_templates(mixture: Mixture) -> List[int]:
    if mixture.logits is not None and mixture.logits.device.type == 'meta':
        return cyclic_order(mixture.num_layers, mixture.num_templates)
    return mixture.argmax_order()


# route(l, x) -> (template index per example (B,), gate per example (B,) or None): a router's decision at layer l
Route = Callable[[int, torch.Tensor], Tuple[torch.Tensor, Optional[torch.Tensor]]]


class RoutedLayer(nn.Module):
    """One executed layer of a routed schedule: a set of statistics for every template it may run.

    In training each template's group of examples is normalized with its own batch statistics
    (`run_routed`), so in eval each template needs its own running statistics; one shared set would
    average templates (and tasks) whose activations differ, and eval would not compute what training did.
    """

    def __init__(self, layer_fn: Callable[..., nn.Module], num_templates: int, drop_path: float = 0.,
                 device=None, dtype=None):
        super().__init__()
        self.per_template = nn.ModuleList([
            layer_fn(drop_path=drop_path, device=device, dtype=dtype) for _ in range(num_templates)])

    def forward(self, x: torch.Tensor, params: Dict[str, torch.Tensor], template: int) -> torch.Tensor:
        return self.per_template[template](x, params)


def run_routed(
        layer: nn.Module,
        x: torch.Tensor,
        templates: Sequence[Dict[str, torch.Tensor]],
        index: torch.Tensor,
        gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One executed layer with a template per example: example b runs `templates[index[b]]`.

    Examples are gathered by template (one stable sort), each template runs once on its group, and the
    results are put back in the batch's order (one gather by the inverse permutation): no loop over examples.
    When every example takes the same template the batch runs as it is, so a route fixed for the whole batch
    computes exactly that hard order. In training each group is normalized with its own batch statistics;
    a `RoutedLayer` keeps running statistics per template (a plain layer's one set is shared by all).
    `gate` (B,), if given, is 1 in value and carries a router's straight-through gradient: the output is
    y * gate, computed as y forward (see blocks.straight_through_gate).
    The group sizes are data: FX symbolic tracing cannot follow this and fails at `tolist()`.
    """
    def run(k: int, g: torch.Tensor) -> torch.Tensor:
        return layer(g, templates[k], k) if isinstance(layer, RoutedLayer) else layer(g, templates[k])

    counts = torch.bincount(index, minlength=len(templates)).tolist()
    used = [k for k, c in enumerate(counts) if c]
    if len(used) == 1:
        y = run(used[0], x)
    else:
        perm = torch.argsort(index, stable=True)
        inverse = torch.empty_like(perm).scatter_(0, perm, torch.arange(len(perm), device=perm.device))
        groups = x.index_select(0, perm).split([counts[k] for k in used])
        y = torch.cat([run(k, g) for k, g in zip(used, groups)]).index_select(0, inverse)
    if gate is not None:
        y = straight_through_gate(y, gate)
    return y


class Schedule(nn.Module):
    """The executed layers of one bank: a mixture, and per layer its normalization statistics.

    `layer_fn(drop_path=rate)` builds one executed layer: a module with `forward(x, params)`
    whose parameters come from the bank and whose buffers (statistics) are its own. A `routed` schedule
    (a router picks each layer's templates) runs on a hard order and keeps, per layer, statistics for
    every template (`RoutedLayer`).
    """

    def __init__(
            self,
            layer_fn: Callable[..., nn.Module],
            mixture: Mixture,
            drop_path_rates: Optional[Sequence[float]] = None,
            routed: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if routed and not mixture.is_hard:
            raise ValueError('a routed schedule runs templates as they are: it needs a hard order')
        self.routed = routed
        self.layer_fn = partial(RoutedLayer, layer_fn, mixture.num_templates) if routed else layer_fn
        self.mixture = mixture
        rates = list(drop_path_rates) if drop_path_rates is not None else [0.] * mixture.num_layers
        if len(rates) != mixture.num_layers:
            raise ValueError(f'{len(rates)} drop-path rates given for {mixture.num_layers} layers')
        self.layers = nn.ModuleList([self.layer_fn(drop_path=r, device=device, dtype=dtype) for r in rates])
        self.grad_checkpointing = False

    # How a soft schedule trains (blocks.run_mixed). True mixes each layer's row when it runs and again in backward;
    # False mixes all L rows in one product and keeps them to backward. None recomputes where the schedule runs more
    # layers than its bank has templates: there the kept rows grow with depth and the parameters do not; with L <= K
    # keeping them is faster and weighs no more than the bank (experiments/speed_gap.py, docs/performance.md).
    recompute_rows: Optional[bool] = None

    def _recomputes(self) -> bool:
        rule = self.recompute_rows
        return self.mixture.num_layers > self.mixture.num_templates if rule is None else bool(rule)

    def _trains_mixed(self, x) -> bool:
        """Whether this forward runs a soft mixture under autograd, eagerly (not traced, scripted or compiled)."""
        return (not self.mixture.is_hard and torch.is_grad_enabled() and not isinstance(x, torch.fx.Proxy)
                and not torch.jit.is_scripting() and not torch.compiler.is_compiling())

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def set_drop_path(self, rates: Sequence[float]) -> None:
        """Stochastic depth rate of each executed layer (of each of a routed layer's per-template copies)."""
        for layer, r in zip(self.layers, rates):
            for m in layer.per_template if self.routed else [layer]:
                m.drop_path = DropPath(r) if r > 0 else nn.Identity()

    def forward(
            self,
            x: torch.Tensor,
            bank: TemplateBank,
            take: Sequence[int] = (),
            end: Optional[int] = None,
            route: Optional[Route] = None,
    ):
        """Run the layers (the first `end` of them, if given); with `take`, also return those layers' outputs.

        With `route` (a router's decisions, hard order only), layer l runs, for each example, the template
        `route(l, x)` names, grouped by template (see `run_routed`) instead of the order's template.
        """
        if (route is not None) != self.routed:
            raise ValueError('a routed schedule runs with a route, and only a routed schedule takes one'
                             f' (routed={self.routed}, route given: {route is not None})')
        if route is None and self._trains_mixed(x) and self._recomputes():
            return run_mixed(self.layers[:end], x, bank.unflatten, self.mixture.alpha(), bank.weight, bank.affine,
                             take, self.grad_checkpointing)
        num_rows = bank.num_templates if self.mixture.is_hard else self.mixture.num_layers
        weight, affine = self.mixture(bank.weight, bank.affine)  # unpacked first: FX can unpack, not star-expand
        rows_params = bank.unflatten_rows(weight, affine, num_rows)
        rows = self.mixture.rows()
        intermediates = []
        for l, layer in enumerate(self.layers[:end]):
            if route is not None:
                index, gate = route(l, x)
                x = run_routed(layer, x, rows_params, index, gate)
            elif self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(layer, x, rows_params[rows[l]], use_reentrant=False)
            else:
                x = layer(x, rows_params[rows[l]])
            if l in take:
                intermediates.append(x)
        return (x, intermediates) if take else x

    @torch.no_grad()
    def reschedule(
            self,
            num_layers: Optional[int] = None,
            order: Optional[Sequence[int]] = None,
            temperature: Optional[float] = None,
            drop_path_rates: Optional[Sequence[float]] = None,
    ) -> None:
        """Change depth and/or order; the bank is untouched.

        A layer where the new schedule runs the same template at the same position as the old one keeps
        its statistics and its logits. Any other layer starts as the first old layer that ran its template:
        that layer's statistics and logits (a layer of a hard order counts as sharp logits, SHARP_LOGIT),
        so a trained or warm-started network computes the same layers when it is made deeper. A layer
        whose template no old layer ran starts with fresh statistics and the mixture's initial logits.
        """
        num_layers = len(order) if order is not None else (num_layers or self.num_layers)
        stats = next(self.layers[0].buffers())  # device and dtype of the layers' statistics
        dd = dict(device=stats.device, dtype=stats.dtype)
        old = self.mixture
        mixture = Mixture(
            num_layers, old.num_templates, order=order,
            temperature=old.temperature if temperature is None else temperature, init_logit=old.init_logit,
            init=old.init, **dd)
        old_templates, new_templates = _scheduled_templates(old), _scheduled_templates(mixture)
        copy_logits = mixture.logits is not None and mixture.logits.device.type != 'meta'
        if copy_logits:
            old_logits = old.logits.detach() if old.logits is not None else order_logits(
                old.order, old.num_templates, SHARP_LOGIT * mixture.temperature)
        rates = list(drop_path_rates) if drop_path_rates is not None else [0.] * num_layers
        layers = []
        for l, template in enumerate(new_templates):
            layer = self.layer_fn(drop_path=rates[l], **dd)
            if l < len(old_templates) and old_templates[l] == template:
                source = l
            else:
                source = old_templates.index(template) if template in old_templates else None
            if source is not None:
                layer.load_state_dict(self.layers[source].state_dict())
                if copy_logits:
                    mixture.logits[l] = old_logits[source]
            layers.append(layer)
        if mixture.logits is not None and old.logits is not None:
            mixture.logits.requires_grad_(old.logits.requires_grad)
        self.mixture = mixture.train(self.training)
        self.layers = nn.ModuleList(layers).train(self.training)

    def truncate(self, num_layers: int) -> None:
        """Keep only the first `num_layers` layers (and their mixture rows), e.g. to prune for features."""
        old = self.mixture
        dd = dict(device=old.logits.device, dtype=old.logits.dtype) if old.logits is not None else {}
        mixture = Mixture(num_layers, old.num_templates, order=None if old.order is None else old.order[:num_layers],
                          temperature=old.temperature, init_logit=old.init_logit, init=old.init, **dd)
        if old.logits is not None:
            mixture.logits = nn.Parameter(old.logits.detach()[:num_layers].clone(), old.logits.requires_grad)
        self.mixture = mixture.train(self.training)
        self.layers = self.layers[:num_layers]
