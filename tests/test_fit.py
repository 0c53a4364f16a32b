"""The in-memory training loop (timm_isomix.tasks.fit): one loop for one task or several, any module, the
studies' committed runs reproduced, resuming along the unstopped path, the device it picks."""
import copy
import json

import pytest
import timm
import torch
from torch.utils.data import TensorDataset

from timm_isomix.models.multitask import MultiTaskIsoMix
from timm_isomix.models.routed_multitask import build_routed_task_model
from timm_isomix.tasks.fit import default_device, evaluate, fit, fit_tasks, random_crop_flip

from helpers import ROOT

RESULTS = ROOT / 'experiments' / 'results'
TRUNK = dict(width=16, depth=4, num_templates=2)


def committed(study: str, config: str, seed: int) -> dict:
    return json.loads((RESULTS / study / 'cpu' / config / f'seed{seed}.json').read_text())


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """The study runner writing its results and state (data caches included) into a fresh folder."""
    monkeypatch.setenv('ISOMIX_RESULTS', str(tmp_path / 'results'))
    monkeypatch.setenv('ISOMIX_STATE', str(tmp_path / 'state'))
    monkeypatch.setenv('ISOMIX_DEVICE', 'cpu')  # the committed runs ran on the CPU, one thread
    from experiments import STUDIES, studies  # noqa: F401  (registers the studies)
    return STUDIES


class _Interrupted(Exception):
    pass


class StopAfter:
    """A run's state (load/save, as experiments.runner.RunState) that interrupts the run after `epochs` saves."""

    def __init__(self, epochs: int):
        self.saved, self.epochs = None, epochs

    def load(self):
        return copy.deepcopy(self.saved)

    def save(self, state):
        self.saved = copy.deepcopy(state)
        if state['epoch'] + 1 == self.epochs:
            raise _Interrupted


# --- the committed runs --------------------------------------------------------------------------------
@pytest.fixture
def kept_rows(monkeypatch):
    """Soft schedules keep their mixed rows from forward to backward, as when the committed runs were made: mixing
    them again in backward (the default, Schedule.recompute_rows) computes the same gradients in another float
    order, and training drifts from the committed digits within an epoch."""
    from timm_isomix.bank import Schedule
    monkeypatch.setattr(Schedule, 'recompute_rows', False)


def test_a_committed_multitask_run_is_reproduced_exactly(shared_dataset, workspace, one_thread, kept_rows):
    """routing-scaling isomix_T2 seed 2 (2 MIN-MTL tasks, 1 epoch of 1,000 images each: the cheapest committed
    run): the same per-task train loss and accuracy, val top-1 and mixtures, to the file's 6 decimals."""
    shared_dataset('miniimagenet32')
    from experiments.runner import run_one
    study = workspace['routing-scaling']
    ref = committed('routing-scaling', 'isomix_T2', 2)
    record = run_one(study, 'isomix_T2', 2, study.scale)
    assert [{k: h[k] for k in r} for h, r in zip(record['history'], ref['history'])] == ref['history']
    assert record['result']['top1'] == ref['result']['top1']
    assert record['result']['task_alphas'] == ref['result']['task_alphas']


def test_mixing_rows_again_in_backward_reproduces_a_committed_multitask_run_to_float_rounding(
        shared_dataset, workspace, one_thread):
    """The default path (rows mixed again in backward) on the run above: the same training up to float order."""
    shared_dataset('miniimagenet32')
    from experiments.runner import run_one
    study = workspace['routing-scaling']
    ref = committed('routing-scaling', 'isomix_T2', 2)
    record = run_one(study, 'isomix_T2', 2, study.scale)
    for h, r in zip(record['history'], ref['history']):
        for key, value in r.items():
            assert h[key] == pytest.approx(value, abs=1e-3), key
    assert record['result']['top1'] == pytest.approx(ref['result']['top1'], abs=0.2)
    for task, alphas in ref['result']['task_alphas'].items():
        assert torch.tensor(record['result']['task_alphas'][task]) == pytest.approx(torch.tensor(alphas), abs=1e-4)


@pytest.mark.slow  # reads 20,000 CIFAR-10 images and trains one epoch of 15,000 (about 40 s)
def test_the_first_epoch_of_a_committed_single_task_run_is_reproduced_exactly(shared_dataset, workspace, one_thread,
                                                                                kept_rows):
    """reuse-cifar10 reuse1 seed 0 (15,000 CIFAR-10 images, random crop and flip, label smoothing), stopped after
    its first epoch: the same train loss and accuracy, val top-1 and mixture measures, to the file's 6 decimals."""
    shared_dataset('cifar10')
    from experiments.classify import train_classifier
    study = workspace['reuse-cifar10']
    ref = committed('reuse-cifar10', 'reuse1', 0)['history'][0]
    state = StopAfter(1)
    with pytest.raises(_Interrupted):
        train_classifier(dict(study.configs['reuse1']), 0, study.scale, state)
    first = state.saved['history'][0]
    assert {k: round(first[k], 6) for k in ref if k != 'time'} == {k: v for k, v in ref.items() if k != 'time'}


# --- one loop, any module ------------------------------------------------------------------------------
def _images(n: int, classes: int, seed: int, size: int = 8) -> TensorDataset:
    """Images whose class sets their mean brightness: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 3, size, size, generator=g) * 0.5 + (y.float() - (classes - 1) / 2)[:, None, None, None]
    return TensorDataset(x, y)


def test_fit_trains_a_plain_timm_resnet_with_augmentation(one_thread):
    torch.manual_seed(0)
    model = timm.create_model('resnet10t', num_classes=3)
    data = _images(96, 3, 0)
    history = fit(model, data, data, epochs=3, batch_size=16, lr=3e-3, augment='crop_flip', smoothing=0.1,
                  device='cpu')
    assert [h['epoch'] for h in history] == [1, 2, 3]
    assert set(history[0]) == {'epoch', 'train_loss', 'train_top1', 'top1', 'time'}
    assert history[-1]['train_loss'] < history[0]['train_loss']
    assert evaluate(model, None, data) == history[-1]['top1']


def test_label_smoothing_changes_the_loss_and_not_the_predictions(one_thread):
    data = _images(64, 4, 1)
    runs = {}
    for smoothing in (0., 0.3):
        torch.manual_seed(0)
        model = timm.create_model('isomix_iso_64_8_p2', num_classes=4, patch_size=2, **TRUNK)
        runs[smoothing] = fit(model, data, epochs=1, batch_size=16, lr=0., device='cpu', smoothing=smoothing)[0]
    assert runs[0.]['train_top1'] == runs[0.3]['train_top1']  # lr 0: the same model sees the same batches
    assert runs[0.]['train_loss'] != runs[0.3]['train_loss']


def test_random_crop_flip_takes_a_crop_of_the_padded_image_or_its_mirror():
    x = torch.randn(6, 2, 8, 8)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode='reflect')
    for flip in (False, True):
        out = random_crop_flip(x, torch.Generator().manual_seed(3), flip=flip)
        assert torch.equal(out, random_crop_flip(x, torch.Generator().manual_seed(3), flip=flip))  # seeded
        for i in range(len(x)):
            crops = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(9) for dx in range(9)]
            crops += [c.flip(-1) for c in crops] if flip else []
            assert any(torch.equal(out[i], c) for c in crops)
    assert not torch.equal(random_crop_flip(x, torch.Generator().manual_seed(3)), x)


def test_multitask_runs_take_one_batch_of_every_task_per_step_and_report_each_task(one_thread):
    torch.manual_seed(0)
    model = MultiTaskIsoMix(timm.create_model('isomix_iso_64_8_p2', num_classes=0, patch_size=2, **TRUNK),
                            {'a': 3, 'b': 2})
    sets = {'a': _images(48, 3, 2), 'b': _images(16, 2, 3)}
    history = fit_tasks(model, sets, sets, epochs=1, batch_size=8, device='cpu')
    # an epoch is the mean task's batches, (6 + 2) / 2 = 4 steps, each with a batch of both tasks
    assert set(history[0]) == {'epoch', 'time'} | {f'{t}_{k}' for t in 'ab' for k in ('train_loss', 'train_top1', 'top1')}
    calls = []
    model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs['task']), with_kwargs=True)
    fit_tasks(model, sets, epochs=1, batch_size=8, device='cpu')
    assert calls == ['a', 'b'] * 4


def test_bad_loop_arguments_name_what_is_expected():
    model = timm.create_model('isomix_iso_64_8_p2', num_classes=3, patch_size=2, **TRUNK)
    data = _images(16, 3, 0)
    with pytest.raises(ValueError, match=r"augment must be one of \[None, 'crop', 'crop_flip'\], got 'flip'"):
        fit(model, data, augment='flip', device='cpu')
    with pytest.raises(ValueError, match="sampling='permutation' trains one task, got 2"):
        fit_tasks(model, {'a': data, 'b': data}, sampling='permutation', device='cpu')
    with pytest.raises(ValueError, match='16 training images give no batch of 32'):
        fit(model, data, batch_size=32, device='cpu')


# --- resuming --------------------------------------------------------------------------------------------
def _single_task_run(state=None):
    torch.manual_seed(0)
    model = timm.create_model('isomix_iso_64_8_p2', num_classes=3, patch_size=2, drop_path_rate=0.2, **TRUNK)
    keep = {'first_start': torch.tensor(float(state is None or state.saved is None))}  # 0 when resuming
    history = fit(model, _images(48, 3, 4), _images(24, 3, 5), epochs=3, batch_size=8, augment='crop_flip',
                  warmup_epochs=1, device='cpu', state=state, keep=keep, seed=1)
    return model, history, keep


def _routed_run(state=None):
    """Per-task REINFORCE routing: its routes are drawn from torch's global RNG, which the state restores."""
    torch.manual_seed(0)
    model = build_routed_task_model('isomix_iso_64_8_p2', {'a': 3, 'b': 2}, 'task', 'reinforce', patch_size=2,
                                    **TRUNK)
    sets = {'a': _images(40, 3, 6), 'b': _images(24, 2, 7)}
    history = fit_tasks(model, sets, sets, epochs=3, batch_size=8, augment='crop', device='cpu', state=state,
                        router_lr=0.05)
    return model, history, None


@pytest.mark.parametrize('run', [_single_task_run, _routed_run], ids=['permutation', 'cycle-routed'])
def test_a_resumed_run_takes_the_path_of_an_unstopped_one(run, one_thread):
    straight, straight_history, _ = run()
    state = StopAfter(1)
    with pytest.raises(_Interrupted):
        run(state)
    assert state.saved['epoch'] == 0
    state.epochs = None  # the second start runs to the end
    resumed, resumed_history, keep = run(state)
    no_time = [{k: v for k, v in h.items() if k != 'time'} for h in straight_history]
    assert [{k: v for k, v in h.items() if k != 'time'} for h in resumed_history] == no_time
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    if keep is not None:  # the caller's kept values come back from the state, as the first start set them
        assert keep['first_start'] == 1.


# --- device --------------------------------------------------------------------------------------------
def test_runs_use_cuda_when_it_is_available_unless_isomix_device_says_otherwise(monkeypatch):
    monkeypatch.delenv('ISOMIX_DEVICE', raising=False)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert default_device() == torch.device('cuda')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert default_device() == torch.device('cpu')
    monkeypatch.setenv('ISOMIX_DEVICE', 'cpu')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert default_device() == torch.device('cpu')
