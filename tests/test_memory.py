"""Training memory of soft schedules: a layer's mixed row theta_l = alpha_l @ T is not kept from forward to backward
but mixed again where backward needs it (blocks.run_mixed, switched by Schedule.recompute_rows). That changes the
float rounding and the peak memory, nothing else: the same gradients and statistics as keeping the rows, the
recomputation really runs, a bank changed in place under it is an error, and a training step holds what a hard
order's holds."""
import contextlib
import json
import subprocess
import sys
from typing import Dict

import pytest
import torch
import timm

import timm_isomix  # noqa: F401  (registers the models)
import timm_isomix.bank
import timm_isomix.blocks
from timm_isomix.bank import Schedule, TemplateBank, cyclic_order
from timm_isomix.blocks import MIX_LABEL


def _live_branches(model: torch.nn.Module, scale: float = 0.2) -> None:
    """The last BN scale of every residual branch (templates and timm's first blocks) set from 0 to `scale`.

    zero_init_last starts them at 0, so no gradient reaches the branches' kernels and an equality of the bank's
    kernel gradients would hold vacuously (0 == 0); a small scale keeps the deep nets well conditioned, so two
    float orders of one computation stay within float32 rounding of each other."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TemplateBank):
                last = [n for n, (group, _, _) in m.layout.items() if group == 'affine' and n.endswith('.weight')][-1]
                for k in range(m.num_templates):
                    m.template(k)[last].fill_(scale)
            elif isinstance(m, torch.nn.BatchNorm2d) and m.affine and not m.weight.any():
                m.weight.fill_(scale)


def _model(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).train()
    _live_branches(model)
    return model


def _images(batch: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _num_soft_schedules(model: torch.nn.Module) -> int:
    return sum(isinstance(m, Schedule) and not m.mixture.is_hard for m in model.modules())


def _spy_run_mixed(monkeypatch) -> Dict[str, int]:
    """Counts the schedules' calls of blocks.run_mixed (the recomputing path)."""
    calls = {'n': 0}
    run_mixed = timm_isomix.blocks.run_mixed

    def spy(*args, **kwargs):
        calls['n'] += 1
        return run_mixed(*args, **kwargs)
    monkeypatch.setattr(timm_isomix.bank, 'run_mixed', spy)
    return calls


def _train_backward(monkeypatch, recompute: bool, name: str, kwargs: dict, checkpointing: bool = False,
                    amp: bool = False, intermediates: bool = False):
    """One forward and backward from the same weights and images, with the rows mixed again or kept."""
    monkeypatch.setattr(Schedule, 'recompute_rows', recompute)
    calls = _spy_run_mixed(monkeypatch)
    model = _model(name, **kwargs)
    model.set_grad_checkpointing(checkpointing)
    autocast = torch.autocast('cpu', dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with autocast:
        if intermediates:
            x, features = model.forward_intermediates(_images(), indices=[1, 3, 5], stop_early=True)
            loss = x.float().square().mean() + sum(f.float().square().mean() for f in features)
        else:
            loss = model(_images()).float().logsumexp(-1).mean()
    loss.backward()
    # the path asked for was the path taken: the comparison below cannot pass by running one path twice
    assert calls['n'] == (_num_soft_schedules(model) if recompute else 0)
    return model


def _assert_same_training(recomputed: torch.nn.Module, kept: torch.nn.Module, rtol: float) -> None:
    """Every parameter's gradient (bank kernels and affine, mixture logits, stem, first blocks, head) and every
    running statistic equal to `rtol`, relative to each element and to the tensor's largest element."""
    params = dict(kept.named_parameters())
    assert any(n.endswith('mixture.logits') for n in params)
    for n, p in recomputed.named_parameters():
        q = params[n]
        if q.grad is None:
            assert p.grad is None, n
            continue
        assert p.grad is not None and p.grad.dtype == q.grad.dtype, n
        if n.endswith('bank.weight'):
            assert q.grad.abs().max() > 0, f'{n}: no gradient reached the templates\' kernels'
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=rtol * q.grad.abs().max().item(), msg=n)
    buffers = dict(kept.named_buffers())
    for n, b in recomputed.named_buffers():
        if b.is_floating_point():
            torch.testing.assert_close(b, buffers[n], rtol=rtol, atol=rtol * buffers[n].abs().max().item(), msg=n)
        else:
            assert torch.equal(b, buffers[n]), n


# --- the same training, in another float order --------------------------------------------------------------

SOFT_MODELS = [
    pytest.param('isomix_resnet18', dict(reuse=1), False, id='resnet18-reuse1'),
    pytest.param('isomix_resnet18', dict(reuse=2), False, id='resnet18-reuse2'),
    pytest.param('isomix_resnet26', dict(reuse=2), False, id='resnet26-reuse2-bottleneck'),
    pytest.param('isomix_resnet18', dict(reuse=2), True, id='resnet18-reuse2-grad-checkpointing'),
    pytest.param('isomix_iso_64_8_p2', {}, False, id='iso'),
    pytest.param('isomix_iso_64_8_p2', {}, True, id='iso-grad-checkpointing'),
]


@pytest.mark.parametrize('name, kwargs, checkpointing', SOFT_MODELS)
def test_mixing_rows_again_in_backward_gives_the_gradients_and_statistics_of_keeping_them(
        monkeypatch, one_thread, name, kwargs, checkpointing):
    recomputed = _train_backward(monkeypatch, True, name, kwargs, checkpointing)
    kept = _train_backward(monkeypatch, False, name, kwargs, checkpointing)
    _assert_same_training(recomputed, kept, rtol=1e-5)


def test_forward_intermediates_taken_and_stopped_early_give_the_gradients_of_keeping_the_rows(monkeypatch, one_thread):
    """`take` and `end` through run_mixed: three layers' outputs in the loss, the last two layers never run."""
    recomputed = _train_backward(monkeypatch, True, 'isomix_iso_64_8_p2', {}, intermediates=True)
    kept = _train_backward(monkeypatch, False, 'isomix_iso_64_8_p2', {}, intermediates=True)
    assert recomputed.head.weight.grad is None and kept.head.weight.grad is None
    logits_grad = recomputed.schedule.mixture.logits.grad
    assert torch.equal(logits_grad[6:], torch.zeros_like(logits_grad[6:]))  # layers after the last taken one
    _assert_same_training(recomputed, kept, rtol=1e-5)


def test_under_bf16_autocast_single_template_banks_give_the_gradients_of_keeping_the_rows(monkeypatch, one_thread):
    """With one template per bank alpha is exactly 1, so both paths hand the convolutions the same bfloat16
    kernels: what differs is only how the rows' gradients are gathered, in float32 on both paths."""
    recomputed = _train_backward(monkeypatch, True, 'isomix_resnet18', dict(reuse=2), amp=True)
    kept = _train_backward(monkeypatch, False, 'isomix_resnet18', dict(reuse=2), amp=True)
    _assert_same_training(recomputed, kept, rtol=1e-5)


def test_under_bf16_autocast_mixed_rows_give_gradients_as_close_to_float32_as_keeping_them(monkeypatch, one_thread):
    """Mixing one row (alpha_l @ T) and all rows in one product (alpha @ T) round differently in float32, and a few
    kernels' bfloat16 casts then differ by one bfloat16 step; through 8 bfloat16 layers that moves the gradients
    by up to 6 %, half as much as bfloat16 itself moves them from float32 (12 %). So the paths are compared loosely
    with each other, and each with the float32 gradients: the recomputed ones are no further from them."""
    recomputed = _train_backward(monkeypatch, True, 'isomix_iso_64_8_p2', {}, amp=True)
    kept = _train_backward(monkeypatch, False, 'isomix_iso_64_8_p2', {}, amp=True)
    exact = _train_backward(monkeypatch, False, 'isomix_iso_64_8_p2', {})
    exact_grads = {n: p.grad for n, p in exact.named_parameters()}
    kept_grads = {n: p.grad for n, p in kept.named_parameters()}

    def distance(a, b):
        return ((a - b).norm() / b.norm()).item()
    for n, p in recomputed.named_parameters():
        g, k, e = p.grad, kept_grads[n], exact_grads[n]
        assert g.dtype == torch.float32, n  # bank and logits gradients in the parameters' dtype, as keeping them
        assert distance(g, k) < 0.2, n
        assert distance(g, e) < 1.3 * distance(k, e) + 0.01, n


def test_backward_twice_and_autograd_grad_give_the_gradients_of_keeping_the_rows(monkeypatch, one_thread):
    """The rows' gradients are gathered anew by every backward through the graph (retain_graph), and only for
    the inputs asked for (torch.autograd.grad)."""
    grads = {}
    for recompute in (True, False):
        monkeypatch.setattr(Schedule, 'recompute_rows', recompute)
        model = _model('isomix_iso_64_8_p2')
        x = _images().requires_grad_()
        loss = model(x).logsumexp(-1).mean()
        loss.backward(retain_graph=True)
        loss.backward()
        wrt_input = torch.autograd.grad(model(x).logsumexp(-1).mean(), [x, model.schedule.mixture.logits])
        grads[recompute] = [model.bank.weight.grad, model.bank.affine.grad, *wrt_input]
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


# --- the recomputation runs ---------------------------------------------------------------------------------

def _mix_events(fn) -> int:
    """How many mixing products run_mixed runs in fn (its profiler label, forward and recomputation)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name == MIX_LABEL for e in prof.events())


@pytest.mark.parametrize('checkpointing', [False, True], ids=['saved-tensor-hooks', 'grad-checkpointing'])
def test_a_soft_training_step_mixes_each_row_when_its_layer_runs_and_again_in_backward(
        monkeypatch, one_thread, checkpointing):
    model = _model('isomix_iso_64_8_p2')
    model.set_grad_checkpointing(checkpointing)
    num_layers = model.schedule.num_layers
    out = {}
    forward = _mix_events(lambda: out.update(loss=model(_images()).logsumexp(-1).mean()))
    backward = _mix_events(lambda: out['loss'].backward())
    assert forward == 2 * num_layers  # each layer's kernel row and affine row
    # the checkpoint runs each layer again, its rows with it; saved-tensor hooks mix each row once for the
    # layer's backward, for its two kernels and two BN scales
    assert backward == 2 * num_layers
    monkeypatch.setattr(Schedule, 'recompute_rows', False)
    assert _mix_events(lambda: model(_images()).logsumexp(-1).mean().backward()) == 0  # one product, rows kept


def test_by_default_rows_are_mixed_again_only_where_a_schedule_runs_more_layers_than_its_bank_has_templates(
        monkeypatch, one_thread):
    """recompute_rows=None: L > K recomputes (the kept rows would grow with depth), L <= K keeps the rows;
    True and False force either way."""
    assert Schedule.recompute_rows is None
    deeper = _model('isomix_iso_64_8_p2', num_templates=4)  # L = 8 > K = 4
    as_deep = _model('isomix_iso_64_8_p2', num_templates=8)  # L = K = 8
    assert (deeper.schedule.num_layers, deeper.bank.num_templates) == (8, 4)
    assert (as_deep.schedule.num_layers, as_deep.bank.num_templates) == (8, 8)

    def events(model):
        return _mix_events(lambda: model(_images()).logsumexp(-1).mean().backward())
    assert events(deeper) == 4 * 8
    assert events(as_deep) == 0
    as_deep.schedule.recompute_rows = True  # on one model's schedule
    assert events(as_deep) == 4 * 8
    deeper.schedule.recompute_rows = False
    assert events(deeper) == 0
    staged = _model('isomix_resnet18', reuse=1)  # one template and one layer per bank
    calls = _spy_run_mixed(monkeypatch)
    staged(_images()).logsumexp(-1).mean().backward()
    assert calls['n'] == 0
    staged2 = _model('isomix_resnet18', reuse=2)
    staged2(_images()).logsumexp(-1).mean().backward()
    assert calls['n'] == _num_soft_schedules(staged2) > 0


def test_hard_orders_and_eval_run_no_mixing_and_no_recomputation(monkeypatch, one_thread):
    calls = _spy_run_mixed(monkeypatch)
    hard = _model('isomix_iso_64_8_p2', order=cyclic_order(8, 4))
    assert _mix_events(lambda: hard(_images()).logsumexp(-1).mean().backward()) == 0
    soft = _model('isomix_iso_64_8_p2').eval()
    out = {}
    with torch.no_grad():
        assert _mix_events(lambda: out.update(before=soft(_images()))) == 0  # eval mixes once in Mixture, and caches
        soft.bank.weight.mul_(1.5)  # no backward to guard: the next forward mixes the changed bank
        assert _mix_events(lambda: out.update(after=soft(_images()))) == 0
    assert not torch.allclose(out['before'], out['after'])
    assert calls['n'] == 0


# --- a bank changed under the recomputation ------------------------------------------------------------------

BANK_MODIFIED = 'the template bank was modified in place between a forward and its backward'


@pytest.mark.parametrize('param, checkpointing', [('weight', False), ('affine', False), ('weight', True)],
                         ids=['kernels', 'affine', 'kernels-grad-checkpointing'])
def test_modifying_the_bank_in_place_between_forward_and_backward_is_an_error(one_thread, param, checkpointing):
    """Backward would mix the rows again from the new bank: gradients of a network that never ran."""
    model = _model('isomix_iso_64_8_p2')
    model.set_grad_checkpointing(checkpointing)
    loss = model(_images()).logsumexp(-1).mean()
    with torch.no_grad():
        getattr(model.bank, param).mul_(1.5)
    with pytest.raises(RuntimeError, match=BANK_MODIFIED):
        loss.backward()


def test_an_optimizer_step_between_training_steps_changes_the_bank_without_error(one_thread):
    model = _model('isomix_iso_64_8_p2')
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = model.bank.weight.detach().clone()
    for _ in range(2):
        model(_images()).logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert not torch.equal(model.bank.weight, before)


# --- peak memory ------------------------------------------------------------------------------------------------

PEAK_MEMORY = '''
import json, sys
from timm_isomix.tools.memory import map_every_block
mapped = map_every_block()  # the peak RSS follows the live tensors (see the test below)
import torch
torch.set_num_threads(1)
from timm_isomix.bank import Schedule
from timm_isomix.tools import benchmark
from timm_isomix.tools.memory import reset_peak_rss
Schedule.recompute_rows = sys.argv[2] == 'recompute'
case = {c.role: c for c in benchmark.make_cases('resnet50')}[sys.argv[1]]
args = benchmark.parse_args(['--device', 'cpu', '--batch-size', '32', '--img-size', '128'])
print(json.dumps(dict(measurable=mapped and reset_peak_rss(), mb=benchmark._peak_memory_mb_here(case, args))))
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt and the peak RSS reset are Linux-only')
def test_a_soft_schedule_trains_in_the_memory_of_its_hard_order_and_keeping_the_rows_takes_more():
    """The benchmark's iso cases (isomix_iso_256_16_p14: K = 8 templates of P = 1.18 M parameters, L = 16 layers) and
    its probe (`_peak_memory_mb_here`: peak RSS over two SGD steps minus the RSS before them, a fresh process each),
    at its CPU default of 32 images at 128 px.

    Measured here: hard order 231 MB, soft 237 MB (1.03x), soft keeping its rows 305 MB (1.29x the soft), each
    within 0.5 MB run to run. With the benchmark's retained heap (retain_freed_memory) the same probes scatter with
    where the heap's holes fall (hard 305-371 MB, soft 323-349 MB: soft / hard from 0.87 to 1.14), too much for a
    5 % bound; a fixed 64 KiB mmap threshold returns every freed tensor to the system, so the peak is the tensors'.
    Not a smaller step: at inputs where the bank's parameters outweigh the activations (16 x 128 px, 32 x 96 px:
    9 and 7 tokens a side) the soft step's backward peaks about 1.1x above the hard order's, although no more than K
    row gradients wait for the bank's (8 x 64 px: 1.03x). Keeping the rows, or a recomputation that fails to drop
    them, costs L x P floats (72 MB) on top: more than 1.1x the soft step."""
    def probe(role: str, rows: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, '-c', PEAK_MEMORY, role, rows], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    procs = {'hard': probe('iso_hard', 'recompute'), 'soft': probe('iso', 'recompute'), 'kept': probe('iso', 'keep')}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        results[name] = json.loads(out.strip().splitlines()[-1])
    if not all(r['measurable'] for r in results.values()):
        pytest.skip('no glibc mallopt or no peak RSS reset (/proc/self/clear_refs) here')
    peak = {name: r['mb'] for name, r in results.items()}
    bank_mb = 8 * (2 * 256 * 256 * 9 + 4 * 256) * 4 / 2 ** 20
    assert peak['hard'] > 2 * bank_mb, peak  # at least the bank's gradient and momentum: the probe measured a step
    assert peak['soft'] <= 1.05 * peak['hard'], peak
    assert peak['kept'] > 1.1 * peak['soft'], peak
