"""Residual blocks whose parameters come from a template bank.

Each class is one *executed layer*: it owns only its normalization statistics (BatchNorm
running mean/var, kept in an affine-free `nn.BatchNorm2d`) and its drop-path; its convolution
kernels and normalization scale/shift arrive at call time as `params`, a dict of tensors shaped
like the parameters of timm's block of the same name (`conv1.weight`, `bn1.weight`, ...), mixed from
the bank or taken from one template. The computation is the same as timm's `BasicBlock` and
`Bottleneck` with stride 1 and an identity shortcut, so their weights run here unchanged.

`run_mixed` runs a soft schedule's layers in training without keeping their mixed rows (see there).
"""
import contextlib
from typing import Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from timm.layers import DropPath

__all__ = ['BasicLayer', 'BottleneckLayer', 'batch_norm', 'no_autocast', 'run_mixed', 'straight_through_gate']


def batch_norm(x: torch.Tensor, stats: nn.BatchNorm2d, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """BatchNorm with this layer's statistics and the bank's (mixed) scale and shift, in one fused op.

    The scale and shift run in the statistics' dtype (float32 under autocast, as nn.BatchNorm2d's own
    parameters do), whatever precision they were mixed in; the input may be float16 or bfloat16.
    """
    mean = stats.running_mean
    if mean is not None and weight is not None:  # a no-op where the dtypes agree
        weight, bias = weight.to(mean.dtype), bias.to(mean.dtype)
    return F.batch_norm(
        x, mean, stats.running_var, weight, bias,
        stats.training or not stats.track_running_stats, stats.momentum, stats.eps)


def _init_template(params: Dict[str, torch.Tensor], last_norm: str, zero_init_last: bool) -> None:
    """timm's ResNet init: He-normal (fan-out) kernels, BN scale 1 and shift 0, last BN scale 0."""
    with torch.no_grad():
        for name, p in params.items():
            if p.ndim > 1:
                nn.init.kaiming_normal_(p, mode='fan_out', nonlinearity='relu')
            elif name.endswith('.weight'):
                p.fill_(0. if zero_init_last and name == f'{last_norm}.weight' else 1.)
            else:
                p.zero_()


class BasicLayer(nn.Module):
    """conv3x3-BN-act-conv3x3-BN, plus identity, then act (timm's BasicBlock at stride 1)."""
    groups = 1  # > 1: several tasks' layers side by side, each on its own channels (models/task_wide.py)

    def __init__(
            self,
            channels: int,
            act_layer: Type[nn.Module] = nn.ReLU,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels, affine=False, **dd)
        self.act1 = act_layer(inplace=True)
        self.bn2 = nn.BatchNorm2d(channels, affine=False, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.act2 = act_layer(inplace=True)

    @staticmethod
    def template_shapes(channels: int) -> Dict[str, Tuple[int, ...]]:
        c = channels
        return {
            'conv1.weight': (c, c, 3, 3), 'bn1.weight': (c,), 'bn1.bias': (c,),
            'conv2.weight': (c, c, 3, 3), 'bn2.weight': (c,), 'bn2.bias': (c,),
        }

    @staticmethod
    def init_template(params: Dict[str, torch.Tensor], zero_init_last: bool = True) -> None:
        _init_template(params, 'bn2', zero_init_last)

    def forward(self, x: torch.Tensor, params: Dict[str, torch.Tensor]) -> torch.Tensor:
        shortcut = x
        x = F.conv2d(x, params['conv1.weight'], padding=1, groups=self.groups)
        x = self.act1(batch_norm(x, self.bn1, params['bn1.weight'], params['bn1.bias']))
        x = F.conv2d(x, params['conv2.weight'], padding=1, groups=self.groups)
        x = self.drop_path(batch_norm(x, self.bn2, params['bn2.weight'], params['bn2.bias']))
        x += shortcut  # in place, as timm's blocks: no new activation-sized tensor (BN backward needs not its output)
        return self.act2(x)


class BottleneckLayer(nn.Module):
    """conv1x1-BN-act-conv3x3-BN-act-conv1x1-BN, plus identity, then act (timm's Bottleneck at stride 1)."""
    groups = 1  # as BasicLayer's

    def __init__(
            self,
            channels: int,
            width: int,
            act_layer: Type[nn.Module] = nn.ReLU,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.bn1 = nn.BatchNorm2d(width, affine=False, **dd)
        self.act1 = act_layer(inplace=True)
        self.bn2 = nn.BatchNorm2d(width, affine=False, **dd)
        self.act2 = act_layer(inplace=True)
        self.bn3 = nn.BatchNorm2d(channels, affine=False, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.act3 = act_layer(inplace=True)

    @staticmethod
    def template_shapes(channels: int, width: int) -> Dict[str, Tuple[int, ...]]:
        c, w = channels, width
        return {
            'conv1.weight': (w, c, 1, 1), 'bn1.weight': (w,), 'bn1.bias': (w,),
            'conv2.weight': (w, w, 3, 3), 'bn2.weight': (w,), 'bn2.bias': (w,),
            'conv3.weight': (c, w, 1, 1), 'bn3.weight': (c,), 'bn3.bias': (c,),
        }

    @staticmethod
    def init_template(params: Dict[str, torch.Tensor], zero_init_last: bool = True) -> None:
        _init_template(params, 'bn3', zero_init_last)

    def forward(self, x: torch.Tensor, params: Dict[str, torch.Tensor]) -> torch.Tensor:
        shortcut = x
        x = F.conv2d(x, params['conv1.weight'], groups=self.groups)
        x = self.act1(batch_norm(x, self.bn1, params['bn1.weight'], params['bn1.bias']))
        x = F.conv2d(x, params['conv2.weight'], padding=1, groups=self.groups)
        x = self.act2(batch_norm(x, self.bn2, params['bn2.weight'], params['bn2.bias']))
        x = F.conv2d(x, params['conv3.weight'], groups=self.groups)
        x = self.drop_path(batch_norm(x, self.bn3, params['bn3.weight'], params['bn3.bias']))
        x += shortcut  # in place, as timm's blocks (see BasicLayer)
        return self.act3(x)


# Column block of the row gradients stacked at a time (elements): the batched backward of `run_mixed` never
# holds an (L, P) copy of them, only (L, _GRAD_BLOCK / L) at a time.
_GRAD_BLOCK = 2 ** 20


def no_autocast(device_type: str):
    """Autocast off for `device_type`; nothing to turn off on devices autocast does not know (meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _StraightThroughGate(torch.autograd.Function):
    """y * gate for a gate that is 1 in value (1 + p - stopgrad(p)): y itself forward, so no multiply and
    exactly y; backward the product's gradients, grad_y unchanged and grad_gate = sum(grad_y * y) per example."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, = ctx.saved_tensors
        return grad, (grad * y).flatten(1).sum(1)


def straight_through_gate(y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """y * gate for a gate of value 1: exactly y forward, the product's gradients backward (a router's gate)."""
    return _StraightThroughGate.apply(y, gate)


class _LayerRows:
    """One training forward of a soft schedule: mixes each layer's row when the layer runs, mixes it again when
    backward needs it, and turns the rows' gradients into those of alpha and the bank (see run_mixed)."""

    def __init__(self, alpha: torch.Tensor, weight: torch.Tensor, affine: torch.Tensor):
        self.need = (alpha.requires_grad, weight.requires_grad, affine.requires_grad)
        self.alpha, self.weight, self.affine = alpha.detach(), weight.detach(), affine.detach()
        self.versions = (weight._version, affine._version)
        device = weight.device.type
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        # the kernels run in autocast's dtype (as a conv casts its weight); scale and shift stay in the bank's
        self.dtypes = (torch.get_autocast_dtype(device) if autocast else weight.dtype, affine.dtype)
        self.pending: Dict[int, Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = {}
        self.sums: List[Optional[torch.Tensor]] = [None, None, None]
        # backward's rows, mixed again: one layer's at a time, each group's whole row once for all the saved
        # tensors that are views into it (a layer's kernels and scales), freed when the layer's gradients arrive
        self.remixed: Tuple[Optional[int], Dict[int, torch.Tensor]] = (None, {})

    def mix(self, l: int, group: int) -> torch.Tensor:
        """Layer l's mixed row of `group` (0: kernels, 1: scale and shift), float32 math."""
        if (self.weight._version, self.affine._version) != self.versions:
            raise RuntimeError('the template bank was modified in place between a forward and its backward')
        source = (self.weight, self.affine)[group]
        with torch.profiler.record_function(MIX_LABEL), no_autocast(source.device.type):
            row = self.alpha[l:l + 1].to(source.dtype) @ source  # (1, K) @ (K, P): faster than a vector's product
        return row[0].to(self.dtypes[group])

    def remix(self, l: int, group: int) -> torch.Tensor:
        """Layer l's whole row of `group`, mixed again for backward (see `remixed`)."""
        layer, rows = self.remixed
        if layer != l:
            layer, rows = l, {}
            self.remixed = (layer, rows)
        if group not in rows:
            rows[group] = self.mix(l, group)
        return rows[group]

    def add(self, l: int, grad_weight: Optional[torch.Tensor], grad_affine: Optional[torch.Tensor]) -> None:
        """Layer l's row gradients. Every K of them (the bank's templates) go into the bank's gradient in one
        batched product: at most K rows wait, as many as the bank's own gradient has."""
        self.pending[l] = (grad_weight, grad_affine)
        if self.remixed[0] == l:
            self.remixed = (None, {})
        if len(self.pending) >= self.weight.shape[0]:
            self._flush()

    def _flush(self) -> None:
        pending, self.pending = self.pending, {}
        index = sorted(pending)
        if not index:
            return
        if self.need[0] and self.sums[0] is None:
            self.sums[0] = torch.zeros_like(self.alpha)
        alpha = self.alpha[index]
        for group, source in enumerate((self.weight, self.affine)):
            rows = [pending[l][group] for l in index]
            if all(r is None for r in rows) or not (self.need[0] or self.need[1 + group]):
                continue
            rows = [torch.zeros_like(source[0]) if r is None else r for r in rows]
            if self.need[1 + group] and self.sums[1 + group] is None:
                self.sums[1 + group] = torch.zeros_like(source)
            grad = self.sums[1 + group]
            step = max(1, _GRAD_BLOCK // len(index))
            for start in range(0, source.shape[1], step):
                g = torch.stack([r[start:start + step] for r in rows]).to(source.dtype)  # (n, block)
                if grad is not None:
                    grad[:, start:start + step].addmm_(alpha.t(), g)  # in place: no (K, block) temporary
                if self.sums[0] is not None:
                    self.sums[0][index] += g @ source[:, start:start + step].t()

    def gradients(self) -> List[Optional[torch.Tensor]]:
        """Gradients of alpha, the bank's weight and affine rows (None where not needed) from every layer's."""
        self._flush()
        sums, self.sums = self.sums, [None, None, None]
        if self.need[0] and sums[0] is None:  # no layer's backward ran
            sums[0] = torch.zeros_like(self.alpha)
        return sums


class _BankGradient(torch.autograd.Function):
    """Joins one forward's layer rows to alpha and the bank: its backward runs after every layer's has, adds
    the rows still waiting, and hands back the gradients of alpha and of the bank."""

    @staticmethod
    def forward(ctx, alpha, weight, affine, rows: _LayerRows):
        ctx.rows = rows
        ctx.set_materialize_grads(False)
        return alpha.new_empty(0)

    @staticmethod
    @once_differentiable
    def backward(ctx, _):
        return (*ctx.rows.gradients(), None)


class _LayerRow(torch.autograd.Function):
    """Layer l's mixed kernel and affine rows; its backward only hands their gradients to the rows' gather."""

    @staticmethod
    def forward(ctx, handle, rows: _LayerRows, l: int):
        ctx.rows, ctx.l = rows, l
        ctx.set_materialize_grads(False)
        return rows.mix(l, 0), rows.mix(l, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_weight, grad_affine):
        ctx.rows.add(ctx.l, grad_weight, grad_affine)
        return None, None, None


MIX_LABEL = 'isomix::mix'  # profiler label of every mixing product run_mixed runs (forward and recomputation)


class _Recompute:
    """A saved tensor that is a view into a layer's mixed row, stored as where it lies in that row."""

    def __init__(self, rows: _LayerRows, l: int, group: int, t: torch.Tensor, base: int):
        self.rows, self.l, self.group = rows, l, group
        self.offset, self.shape, self.stride = t.storage_offset() - base, t.shape, t.stride()

    def tensor(self) -> torch.Tensor:
        row = self.rows.remix(self.l, self.group)
        return row.as_strided(self.shape, self.stride, row.storage_offset() + self.offset)


def run_mixed(
        layers: Sequence[nn.Module],
        x: torch.Tensor,
        unflatten,
        alpha: torch.Tensor,
        weight: torch.Tensor,
        affine: torch.Tensor,
        take: Sequence[int] = (),
        grad_checkpointing: bool = False,
):
    """A soft schedule's layers in training, without keeping their mixed rows for backward.

    Layer l's row theta_l = alpha_l @ T is mixed when the layer runs and freed when it is done; what the layer's
    backward needs of it (its kernels and scale) is mixed again from alpha and the bank, the columns it needs
    only (saved-tensor hooks). The rows' gradients go into the gradients of alpha and the bank K rows at a time,
    in batched products over column blocks (`_LayerRows.add`, `_BankGradient`). So a soft schedule holds in
    training what a hard order holds: the activations, and the bank and its gradient, at the price of a second
    mixing product.
    `unflatten(weight_row, affine_row)` gives a layer its parameters as views into its rows.
    """
    rows = _LayerRows(alpha, weight, affine)
    handle = _BankGradient.apply(alpha, weight, affine, rows)
    intermediates = []

    def run(l: int, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        row_w, row_a = _LayerRow.apply(handle, rows, l)
        return layer(x, unflatten(row_w, row_a))

    for l, layer in enumerate(layers):
        if grad_checkpointing:  # the checkpoint recomputes the row with the layer
            x = checkpoint(run, l, layer, x, use_reentrant=False)
        else:
            row_w, row_a = _LayerRow.apply(handle, rows, l)
            own = {r.untyped_storage().data_ptr(): (group, r.storage_offset(), r.dtype)
                   for group, r in enumerate((row_w, row_a))}

            def pack(t: torch.Tensor, l=l, own=own):
                hit = own.get(t.untyped_storage().data_ptr()) if t.layout == torch.strided else None
                return t if hit is None or hit[2] != t.dtype else _Recompute(rows, l, hit[0], t, hit[1])

            with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
                x = layer(x, unflatten(row_w, row_a))
            del row_w, row_a
        if l in take:
            intermediates.append(x)
    return (x, intermediates) if take else x


def _unpack(saved):
    return saved.tensor() if isinstance(saved, _Recompute) else saved
