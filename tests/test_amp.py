"""Mixed precision (autocast), as in timm: every isomix model kind trains and evaluates under float16 and bfloat16
autocast wherever timm's ResNets do; normalization runs in float32; train.py and validate.py run with --amp.

timm's resnet18 under the same autocast is the reference: its output dtype is what an isomix model gives, and a
warm-started isomix_resnet18 computes exactly what it computes (outputs, statistics and gradients).
"""
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
import timm_isomix  # noqa: F401  (registers the models)
from timm_isomix import TemplateBank, resnet_to_isomix
from timm_isomix.bank import RoutedLayer
from timm_isomix.blocks import BasicLayer, BottleneckLayer, batch_norm
from timm_isomix.models.multitask import MultiTaskIsoMix
from timm_isomix.models.routers import Router, routing_loss

from helpers import ROOT, make_tiny_folder

PY = sys.executable
DTYPES = [torch.float16, torch.bfloat16]
NUM_CLASSES = 5
# The model kinds start as timm's ResNets do (each residual branch's last BN scale zero): from a live start,
# unscaled float16 gradients overflow in timm's own deeper ResNets too (resnet34 with zero_init_last=False: an
# inf stem gradient at the first backward). Where outputs are compared to timm's, the branches are live, so
# that the banked layers' arithmetic shows:
LIVE = dict(zero_init_last=False)


def _inputs(batch: int = 2, size: int = 32, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, NUM_CLASSES, (batch,), generator=g)


# --- the model kinds ------------------------------------------------------------------------------------
# name -> builder; each model is called as `model(x, **kwargs)` once per entry of its list of call kwargs
# (a multi-task model once per task, so that one step reaches every task's parameters).
def _multitask(backbone: str, **kwargs) -> nn.Module:
    return MultiTaskIsoMix(timm.create_model(backbone, num_classes=0, **kwargs), {'a': NUM_CLASSES, 'b': 3})


MODELS: Dict[str, Tuple[Callable[[], nn.Module], List[dict]]] = {
    'resnet18_soft_reuse1': (lambda: timm.create_model('isomix_resnet18', num_classes=NUM_CLASSES, reuse=1), [{}]),
    'resnet18_soft_reuse2': (lambda: timm.create_model('isomix_resnet18', num_classes=NUM_CLASSES, reuse=2), [{}]),
    'resnet18_hard_order': (lambda: timm.create_model(
        'isomix_resnet18', num_classes=NUM_CLASSES, order=[[0, 0]] * 4), [{}]),
    # banks of two templates (isomix_resnet18's banks hold one): a mixture that really mixes in the staged family
    'resnet_two_templates_soft': (lambda: timm.create_model(
        'isomix_resnet18', num_classes=NUM_CLASSES, layers=(3, 3, 3, 3), reuse=2, mixture_init='random'), [{}]),
    'iso_soft': (lambda: timm.create_model('isomix_iso_64_8_p2', num_classes=NUM_CLASSES), [{}]),
    'iso_hard_order': (lambda: timm.create_model(
        'isomix_iso_64_8_p2', num_classes=NUM_CLASSES, order=[0, 1, 2, 3, 3, 2, 1, 0]), [{}]),
    'routed_per_input_gumbel': (lambda: timm.create_model(
        'isomix_iso_64_8_p2', num_classes=NUM_CLASSES, routing='input', router='gumbel'), [{}]),
    'routed_per_task_reinforce': (lambda: timm.create_model(
        'isomix_iso_64_8_p2', num_classes=NUM_CLASSES, routing='task', router='reinforce', num_tasks=2),
        [{'task': 1}]),
    'multitask_iso': (lambda: _multitask('isomix_iso_64_8_p2'), [{'task': 'a'}, {'task': 'b'}]),
    'multitask_resnet18': (lambda: _multitask('isomix_resnet18', reuse=2), [{'task': 'a'}, {'task': 'b'}]),
}


def _build(kind: str) -> Tuple[nn.Module, List[dict]]:
    torch.manual_seed(0)
    build, calls = MODELS[kind]
    return build(), calls


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, calls: List[dict], dtype: torch.dtype):
    """Training loss as train.py's loop computes it: the classification loss under autocast, a router's loss
    (REINFORCE rewards) outside it. Returns (loss, outputs)."""
    routers = [m for m in model.modules() if isinstance(m, Router)]
    total, outputs = 0., []
    for kw in calls:
        classes = model.tasks[kw['task']].head.out_features if isinstance(model, MultiTaskIsoMix) else NUM_CLASSES
        target = y % classes
        with torch.autocast('cpu', dtype=dtype):
            out = model(x, **kw)
            loss = F.cross_entropy(out, target)
        extra = routing_loss(routers, out, target)
        total = total + (loss if extra is None else loss + extra)
        outputs.append(out)
    return total, outputs


@functools.lru_cache(maxsize=None)
def _timm_resnet18_dtypes(dtype: torch.dtype) -> Tuple[torch.dtype, torch.dtype]:
    """Output dtypes of timm's resnet18 under autocast, training and eval; raises where timm's ResNet cannot
    run under this autocast (some torch versions lack float16 CPU kernels)."""
    torch.manual_seed(0)
    resnet = timm.create_model('resnet18', num_classes=NUM_CLASSES)
    x, y = _inputs()
    with torch.autocast('cpu', dtype=dtype):
        out = resnet(x)
        loss = F.cross_entropy(out, y)
    loss.backward()
    with torch.no_grad(), torch.autocast('cpu', dtype=dtype):
        out_eval = resnet.eval()(x)
    return out.dtype, out_eval.dtype


def _reference(dtype: torch.dtype) -> Tuple[torch.dtype, torch.dtype]:
    try:
        return _timm_resnet18_dtypes(dtype)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"timm's resnet18 does not run under CPU autocast to {dtype} here: {str(e).splitlines()[0]}")


def _banked_layers(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (BasicLayer, BottleneckLayer))]


def _stats(layer: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in layer.named_buffers() if 'running' in n}


# --- every model kind trains and evaluates under autocast ---------------------------------------------------
@pytest.mark.parametrize('kind', list(MODELS))
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
def test_every_model_kind_trains_and_evaluates_under_autocast_as_timms_resnet18_does(kind, dtype, one_thread):
    train_dtype, eval_dtype = _reference(dtype)  # logits in the autocast dtype, with torch 2.x
    model, calls = _build(kind)
    x, y = _inputs()
    loss, outputs = _loss(model.train(), x, y, calls, dtype)
    assert all(out.dtype == train_dtype for out in outputs)
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    loss.backward()
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and p.grad is None]
    assert not missing, f'no gradient reached {missing}'
    for name, p in params.items():
        assert p.dtype == p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), f'{name}: non-finite gradient'
    assert any(p.grad.abs().sum() > 0 for n, p in params.items() if n.split('.')[-2] == 'bank')
    model.eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=dtype):
        for kw in calls:
            out = model(x, **kw)
            assert out.dtype == eval_dtype and torch.isfinite(out).all()


# --- normalization in float32 ------------------------------------------------------------------------------
@pytest.mark.parametrize('kind', list(MODELS))
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
def test_a_training_step_under_autocast_updates_float32_statistics_of_every_banked_layer(kind, dtype, one_thread):
    """One SGD update (the gradients are finite, see above): the statistics stay float32 and move in every
    executed layer (in a routed layer: those of a template that ran), and every bank, still float32, is updated."""
    _reference(dtype)
    model, calls = _build(kind)
    layers = _banked_layers(model)
    assert layers
    before = [_stats(layer) for layer in layers]
    banks = {n: b for n, b in model.named_modules() if isinstance(b, TemplateBank)}
    bank_before = {n: [p.detach().clone() for p in b.parameters()] for n, b in banks.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _inputs()
    loss, _ = _loss(model.train(), x, y, calls, dtype)
    loss.backward()
    optimizer.step()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean.dtype == m.running_var.dtype == torch.float32
    moved = [any(not torch.equal(v, layer_before[n]) for n, v in _stats(layer).items())
             for layer, layer_before in zip(layers, before)]
    routed = [m for m in model.modules() if isinstance(m, RoutedLayer)]
    if routed:  # every executed layer ran at least one of its templates
        per_layer = [[moved[layers.index(t)] for t in r.per_template] for r in routed]
        assert all(any(ran) for ran in per_layer), per_layer
    else:
        assert all(moved), moved
    for name, bank in banks.items():
        assert all(p.dtype == torch.float32 for p in bank.parameters())
        assert any(not torch.equal(p, w) for p, w in zip(bank.parameters(), bank_before[name])), f'{name} not updated'


@pytest.mark.parametrize('weight_dtype', ['float32', 'low'])
@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
def test_batch_norm_under_autocast_computes_what_nn_batchnorm2d_computes(dtype, training, weight_dtype):
    """A low-precision input (a conv's output under autocast) with float32 statistics: batch_norm gives the very
    output and running statistics of nn.BatchNorm2d, whose float32 scale and shift are the bank's (rounded to
    the autocast dtype when the bank's rows come in it)."""
    _reference(dtype)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 6, 5, 5, generator=g) * 3 + 2).to(dtype)
    weight, bias = torch.randn(6, generator=g) * 0.3 + 1, torch.randn(6, generator=g) * 0.2
    if weight_dtype == 'low':
        weight, bias = weight.to(dtype), bias.to(dtype)
    stats = nn.BatchNorm2d(6, affine=False)
    reference = nn.BatchNorm2d(6)
    with torch.no_grad():
        for bn in (stats, reference):
            bn.running_mean.uniform_(-1, 1, generator=torch.Generator().manual_seed(1))
            bn.running_var.uniform_(0.5, 2, generator=torch.Generator().manual_seed(2))
        reference.weight.copy_(weight.float())
        reference.bias.copy_(bias.float())
    stats.train(training)
    reference.train(training)
    with torch.autocast('cpu', dtype=dtype):
        out = batch_norm(x, stats, weight, bias)
        expected = reference(x)
    assert out.dtype == expected.dtype == dtype
    assert torch.equal(out, expected)
    for name in ('running_mean', 'running_var'):
        assert getattr(stats, name).dtype == torch.float32
        assert torch.equal(getattr(stats, name), getattr(reference, name)), name


@pytest.mark.parametrize('schedule', [dict(order=[[0]] * 4), dict(reuse=1)], ids=['hard_identity_order', 'soft'])
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
def test_warm_started_isomix_resnet18_under_autocast_computes_exactly_timms_resnet18_under_autocast(dtype, schedule,
                                                                                                    one_thread):
    """The ResNet's own schedule (a hard identity order, or sharp one-template mixtures) over its weights: in
    training the same logits, running statistics and gradients (mapped onto the bank as a state dict is), and
    in eval the same logits, to the bit. BN scales and shifts are random, so that one rounded to the autocast
    dtype (mixed under autocast, say) shows."""
    _reference(dtype)
    torch.manual_seed(0)
    resnet = timm.create_model('resnet18', num_classes=NUM_CLASSES, **LIVE)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in (m for m in resnet.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.normal_(1., 0.2, generator=g)
            bn.bias.normal_(0., 0.1, generator=g)
            bn.running_mean.normal_(0., 0.2, generator=g)
            bn.running_var.uniform_(0.5, 2., generator=g)
    model = timm.create_model('isomix_resnet18', num_classes=NUM_CLASSES, **schedule)
    model.load_state_dict(resnet_to_isomix(resnet.state_dict(), model))
    x, y = _inputs()
    outputs = []
    for m in (resnet, model):
        with torch.autocast('cpu', dtype=dtype):
            out = m.train()(x)
            loss = F.cross_entropy(out, y)
        loss.backward()
        outputs.append(out)
    assert outputs[0].dtype == outputs[1].dtype == dtype
    assert torch.equal(outputs[0], outputs[1])
    # the ResNet's gradients and statistics, laid out as the isomix model's state dict
    expected = resnet_to_isomix({**resnet.state_dict(), **{n: p.grad for n, p in resnet.named_parameters()}}, model)
    for name, p in model.named_parameters():
        if not name.endswith('mixture.logits'):  # one template: softmax over one logit, zero gradient
            assert torch.equal(p.grad, expected[name]), f'{name}: gradient differs from the ResNet\'s'
    for name, b in model.named_buffers():
        if 'running' in name:
            assert b.dtype == torch.float32 and torch.equal(b, expected[name]), name
    with torch.no_grad(), torch.autocast('cpu', dtype=dtype):
        assert torch.equal(resnet.eval()(x), model.eval()(x))


def _calibrated(kind: str) -> nn.Module:
    """The model with non-trivial templates' scale and shift (N(1, 0.2), N(0, 0.1)) and running statistics
    set, in float32, to those of one batch of 16 images: an eval mode that normalizes with real statistics."""
    model, _ = _build(kind)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bank in (m for m in model.modules() if isinstance(m, TemplateBank)):
            for k in range(bank.num_templates):
                for name, p in bank.template(k).items():
                    if p.ndim == 1:
                        p.normal_(1., 0.2, generator=g) if name.endswith('.weight') else p.normal_(0., 0.1, generator=g)
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.momentum = 1.0  # the running statistics become the calibration batch's
        model.train()(torch.randn(16, 3, 32, 32, generator=g))
    return model.eval()


@pytest.mark.parametrize('kind,tolerance', [('iso_soft', 0.02), ('resnet_two_templates_soft', 0.15)])
def test_bf16_eval_of_a_soft_mixture_is_close_to_its_float32_eval(kind, tolerance, one_thread):
    """Relative error of the logits (8 images). Measured: ~0.4 % (isometric), ~6 % (staged: at 32 px its deep
    stages normalize 1x1 maps, and timm's resnet18 itself is off by 3-7 % in the same setup). Normalization
    that goes wrong under autocast fails either bound by far: without the scale 35 % / 110 %, with batch
    statistics 5 % / 90 %. (Statistics rounded to bfloat16 stay within it: the tests above catch those.)"""
    _reference(torch.bfloat16)
    model = _calibrated(kind)
    x, _ = _inputs(batch=8, seed=2)
    with torch.no_grad():
        expected = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16 and expected.dtype == torch.float32  # the two runs did differ in precision
    error = ((out.float() - expected).norm() / expected.norm()).item()
    assert 0 < error < tolerance, f'relative error of bf16 logits {error:.4f}'


# --- train.py and validate.py with --amp --------------------------------------------------------------------
def _run(cmd, **kw):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, **kw)


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def _train_losses(stderr: str) -> List[float]:
    return [float(v) for v in re.findall(r'Train: \d+ \[.*?\]\s+Loss: (\S+)', stderr)]


@pytest.fixture(scope='module')
def tiny_cifar(shared_dataset, tmp_path_factory):
    return make_tiny_folder(shared_dataset('cifar10'), tmp_path_factory.mktemp('tiny_cifar_amp'), 6, 3)


def test_train_py_with_amp_bfloat16_trains_and_validate_py_with_amp_reproduces_its_eval(tiny_cifar, tmp_path):
    """60 CIFAR-10 images at 16 px, 6 updates of isomix_iso_64_8_p2 under bfloat16 autocast (no loss scaler, as
    timm), then validate.py under the same autocast on the checkpoint: train.py's evaluation, number for number."""
    _reference(torch.bfloat16)
    train = _run([PY, str(ROOT / 'train.py'), '--data-dir', str(tiny_cifar), '--model', 'isomix_iso_64_8_p2',
                  '--img-size', '16', '-b', '10', '-j', '0', '--epochs', '1', '--opt', 'adamw', '--lr', '2e-3',
                  '--warmup-epochs', '0', '--amp', '--amp-dtype', 'bfloat16', '--val-split', 'val', '--device', 'cpu',
                  '--log-interval', '2', '--seed', '3', '--output', str(tmp_path), '--experiment', 'amp'], timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    losses = _train_losses(train.stderr)
    assert losses and all(math.isfinite(v) for v in losses), losses
    ckpt = _load(tmp_path / 'amp' / 'last.pth.tar')
    assert ckpt['args']['amp'] is True and ckpt['args']['amp_dtype'] == 'bfloat16'
    assert 'amp_scaler' not in ckpt  # bfloat16 needs no loss scaling
    assert all(t.dtype == torch.float32 for t in ckpt['state_dict'].values() if t.is_floating_point()), \
        'the checkpoint holds low-precision tensors'

    out = tmp_path / 'r.json'
    validate = _run([PY, str(ROOT / 'validate.py'), '--checkpoint', str(tmp_path / 'amp' / 'last.pth.tar'),
                     '--data-dir', str(tiny_cifar), '--split', 'val', '-b', '10', '-j', '0', '--device', 'cpu',
                     '--amp', '--amp-dtype', 'bfloat16', '--results-file', str(out)], timeout=300)
    assert validate.returncode == 0, validate.stderr[-3000:]
    row, = json.loads(out.read_text())
    assert row['samples'] == 30 and math.isfinite(row['loss'])
    assert f'top-1 {row["top1"]:.2f}  top-5 {row["top5"]:.2f}' in validate.stdout
    assert row['top1'] == pytest.approx(ckpt['results']['top1'], abs=1e-3)
    assert row['loss'] == pytest.approx(ckpt['results']['loss'], rel=1e-3)


def _recipe_folder(src: Path, dst: Path, classes: int, train_per_class: int, val_per_class: int) -> Path:
    """An ImageFolder of the first `classes` classes of a shared dataset with the splits the ImageNet recipe
    names (train, validation)."""
    for split, out_split, n in (('train', 'train', train_per_class), ('val', 'validation', val_per_class)):
        for cls in sorted(os.listdir(src / split))[:classes]:
            (dst / out_split / cls).mkdir(parents=True, exist_ok=True)
            for f in sorted(os.listdir(src / split / cls))[:n]:
                shutil.copy(src / split / cls / f, dst / out_split / cls / f)
    return dst


def test_the_imagenet_recipe_as_written_starts_training_on_the_cpu(shared_dataset, tmp_path):
    """`train.py -c hparams/isomix_resnet50_in1k.yaml`: isomix_resnet50 reuse 2, LAMB, BCE, Mixup + CutMix,
    RandAugment, drop-path, channels-last and `amp: true` (float16, so timm's NativeScaler on the CPU) kept.
    Overridden only what the CPU and the tiny data force:
    --num-classes 3 (3 classes of CIFAR-10 instead of ImageNet's 1000), -b 2 and --img-size 64 (a CPU step of
    the 224 px, 256-image batch would take minutes; 2 is the smallest even batch Mixup takes), --epochs 1,
    -j 0 (8 worker processes only add start-up time on a 2-core CPU), --device cpu, --aug-repeats 0 (timm's
    repeated augmentation needs a distributed sampler). pin_mem stays (a warning without an accelerator)."""
    _reference(torch.float16)
    data = _recipe_folder(shared_dataset('cifar10'), tmp_path / 'data', classes=3, train_per_class=2, val_per_class=1)
    result = _run([PY, str(ROOT / 'train.py'), '-c', str(ROOT / 'hparams' / 'isomix_resnet50_in1k.yaml'),
                   '--data-dir', str(data), '--num-classes', '3', '-b', '2', '--img-size', '64', '--epochs', '1',
                   '-j', '0', '--device', 'cpu', '--aug-repeats', '0',
                   '--output', str(tmp_path), '--experiment', 'in1k'], timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = _train_losses(result.stderr)
    assert losses and all(math.isfinite(v) for v in losses), losses
    ckpt = _load(tmp_path / 'in1k' / 'last.pth.tar')
    args = ckpt['args']
    assert ckpt['arch'] == 'isomix_resnet50' and args['model_kwargs'] == {'reuse': 2}
    kept = ('opt', 'bce_loss', 'bce_target_thresh', 'mixup', 'cutmix', 'aa', 'drop_path')
    assert [args[k] for k in kept] == ['lamb', True, 0.2, 0.1, 1.0, 'rand-m7-mstd0.5-inc1', 0.05]
    assert args['amp'] is True and args['amp_dtype'] == 'float16' and args['channels_last'] is True
    assert 'amp_scaler' in ckpt  # float16 trains through the loss scaler
    assert ckpt['epoch'] == 0 and set(ckpt['results']) == {'top1', 'top5', 'loss'}
    assert math.isfinite(ckpt['results']['loss'])
