"""train.py and timm_isomix.train: the optimizer groups, checkpoints, resume after a real kill, torchrun on CPU."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import timm
import timm_isomix  # noqa: F401
from timm_isomix.train.checkpoint import CheckpointKeeper, atomic_save
from timm_isomix.train.mixture_log import mixture_report, write_mixture_heatmap
from timm_isomix.train.optim import mixture_param_groups
from timm_isomix.train.plots import plot_mixtures

from helpers import ROOT, make_tiny_folder

PY = sys.executable
CONTRACT_KEYS = {'epoch', 'arch', 'model_args', 'state_dict', 'optimizer', 'scheduler', 'args', 'metric',
                 'data_config', 'results'}


@pytest.fixture(scope='module')
def tiny_cifar(shared_dataset, tmp_path_factory):
    return make_tiny_folder(shared_dataset('cifar10'), tmp_path_factory.mktemp('tiny_cifar'), 6, 3)


def train_cmd(data: Path, out: Path, experiment: str, *extra: str):
    """A tiny, fully deterministic run (-j 0): 60 images at 16 px, 6 updates per epoch."""
    return [PY, str(ROOT / 'train.py'), '--data-dir', str(data), '--model', 'isomix_iso_64_8_p2',
            '--img-size', '16', '-b', '10', '-j', '0', '--opt', 'adamw', '--lr', '2e-3', '--warmup-epochs', '1',
            '--mixture-lr-mult', '20', '--mixup', '0.2', '--model-ema', '--model-ema-decay', '0.9',
            '--val-split', 'val', '--device', 'cpu', '--log-interval', '2', '--seed', '3',
            '--output', str(out), '--experiment', experiment, *extra]


def run(cmd, **kw):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, **kw)


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


# --- optimizer ------------------------------------------------------------------------------------
def test_mixture_logits_form_their_own_group_without_weight_decay_at_scaled_lr():
    model = timm.create_model('isomix_iso_64_8_p2')
    groups = mixture_param_groups(model, weight_decay=0.05, lr=0.1, mixture_lr_mult=5.0)
    mixture = [g for g in groups if g.get('group_name') == 'mixture']
    assert len(mixture) == 1
    assert mixture[0]['weight_decay'] == 0. and mixture[0]['lr'] == pytest.approx(0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in mixture[0]['params']] == ['schedule.mixture.logits']
    others = [p for g in groups if g is not mixture[0] for p in g['params']]
    assert all(not names[id(p)].endswith('mixture.logits') for p in others)
    assert len(others) + 1 == len(list(model.parameters()))  # every parameter in exactly one group
    affine = [g for g in groups if any(names[id(p)] == 'bank.affine' for p in g['params'])]
    assert affine[0]['weight_decay'] == 0.  # model.no_weight_decay() lists *.bank.affine


# --- checkpoints ------------------------------------------------------------------------------------
class _FailsToPickle:
    def __reduce__(self):
        raise RuntimeError('disk full (simulated in pickling)')


def test_failed_checkpoint_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / 'last.pth.tar'
    atomic_save({'epoch': 1, 'w': torch.ones(3)}, str(path))
    with pytest.raises(RuntimeError):
        atomic_save({'epoch': 2, 'bad': _FailsToPickle()}, str(path))
    assert load(path)['epoch'] == 1
    assert os.listdir(tmp_path) == ['last.pth.tar']


_WRITER = """
import sys, torch
from timm_isomix.train.files import atomic_save
big = torch.randn(4_000_000)  # 16 MB per checkpoint
i = 0
while True:
    i += 1
    atomic_save({'epoch': i, 'w': big, 'check': big.sum()}, sys.argv[1])
    print(i, flush=True)
"""


def test_sigkill_while_writing_checkpoints_always_leaves_a_complete_one(tmp_path):
    path = tmp_path / 'last.pth.tar'
    proc = subprocess.Popen([PY, '-c', _WRITER, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == '1'  # first checkpoint complete
        for delay in (0.0, 0.03, 0.11, 0.07):  # several kills at different points of a write
            time.sleep(delay)
            proc.send_signal(signal.SIGSTOP)
            ckpt = load(path)  # the file in place is always a whole checkpoint
            assert torch.allclose(ckpt['w'].sum(), ckpt['check'])
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.05)
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpt = load(path)
    assert torch.allclose(ckpt['w'].sum(), ckpt['check'])


def test_checkpoint_keeper_keeps_the_best_hist_epochs_the_best_and_the_last(tmp_path):
    keeper = CheckpointKeeper(str(tmp_path), hist=2)
    for epoch, metric in enumerate([10., 30., 20., 5.]):
        keeper.save({'epoch': epoch, 'metric': metric}, epoch, metric)
    files = sorted(os.listdir(tmp_path))
    assert files == ['checkpoint-1.pth.tar', 'checkpoint-2.pth.tar', 'last.pth.tar', 'model_best.pth.tar']
    assert load(tmp_path / 'model_best.pth.tar')['epoch'] == 1
    assert load(tmp_path / 'last.pth.tar')['epoch'] == 3
    again = CheckpointKeeper(str(tmp_path), hist=2)  # a resumed run knows what was kept
    assert sorted(again.kept) == [(1, 30.), (2, 20.)] and again.best == (1, 30.)


# --- schedule logging ---------------------------------------------------------------------------------
def test_mixture_report_gives_order_and_entropy_per_layer_and_heatmap_is_a_png(tmp_path):
    model = timm.create_model('isomix_resnet50', num_classes=10, init_logit=16.0)  # banks of 2, 3, 5, 2; sharp start
    with torch.no_grad():
        model.mixtures()['stages.1'].logits.zero_()  # uniform over 3 templates: entropy ln 3 per layer
    lines = mixture_report(model)
    assert [line.split(':')[0] for line in lines] == ['stages.0', 'stages.1', 'stages.2', 'stages.3']
    stage1 = lines[1]
    assert 'order [0, 0, 0, 0, 0, 0]' in stage1 and stage1.count('1.099') == 7  # 6 layers + uniform reference
    assert 'order [0, 1, 0, 1]' in lines[0] and 'entropy [0.000 0.000 0.000 0.000]' in lines[0]  # reuse 2, one-hot
    path = write_mixture_heatmap(model, str(tmp_path), epoch=0)
    assert path == str(tmp_path / 'mixtures.png')
    assert (tmp_path / 'mixtures.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    with pytest.raises(ValueError, match='layers, templates'):
        plot_mixtures({'bad': torch.ones(3)}, str(tmp_path / 'x.png'))


# --- whole runs ------------------------------------------------------------------------------------------
def test_resume_after_sigkill_continues_exactly_where_an_uninterrupted_run_goes(tiny_cifar, tmp_path):
    epochs = ['--epochs', '3']
    # The run that is killed: SIGKILL once epoch 0's checkpoint exists, while epoch 1 is training.
    proc = subprocess.Popen(train_cmd(tiny_cifar, tmp_path, 'killed', *epochs), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS='1'))
    last = tmp_path / 'killed' / 'last.pth.tar'
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    alive = proc.poll() is None
    proc.kill()
    proc.wait()
    assert alive, 'training ended before it could be killed'
    killed_at = load(last)['epoch']
    assert killed_at < 2
    resumed = run(train_cmd(tiny_cifar, tmp_path, 'killed', *epochs, '--resume', str(last)), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f'Resumed {last} (epoch {killed_at} done)' in resumed.stderr
    straight = run(train_cmd(tiny_cifar, tmp_path, 'straight', *epochs), timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]

    a, b = load(tmp_path / 'straight' / 'last.pth.tar'), load(last)
    assert a['epoch'] == b['epoch'] == 2
    for key in ('state_dict', 'state_dict_ema'):
        for name, t in a[key].items():
            assert torch.allclose(t.float(), b[key][name].float(), atol=1e-6), f'{key}.{name} differs after resume'
    assert a['scheduler']['base_values'] == b['scheduler']['base_values']
    assert a['results'] == pytest.approx(b['results'])
    # the schedule actually trained: the mixture logits moved off their initial one-hot values
    logits = a['state_dict']['schedule.mixture.logits']
    assert not torch.equal(logits, timm.create_model('isomix_iso_64_8_p2').schedule.mixture.logits.detach())

    # the checkpoint contract the Hub publisher relies on
    assert CONTRACT_KEYS | {'state_dict_ema'} <= set(a)
    assert a['arch'] == 'isomix_iso_64_8_p2' and a['model_args']['num_classes'] == 10
    model = timm.create_model(a['arch'], **a['model_args'])
    model.load_state_dict(a['state_dict'])
    assert isinstance(a['args'], dict) and a['args']['epochs'] == 3
    assert a['data_config']['input_size'] == [3, 16, 16]
    assert set(a['results']) == {'top1', 'top5', 'loss'} and a['metric'] == a['results']['top1']
    out = tmp_path / 'killed'
    for name in ('model_best.pth.tar', 'summary.csv', 'args.yaml', 'mixtures.png'):
        assert (out / name).is_file(), name
    rows = (out / 'summary.csv').read_text().strip().splitlines()
    assert [r.split(',')[0] for r in rows[1:]] == ['0', '1', '2']  # no epoch lost or repeated
    assert 'Mixtures (epoch 2) schedule: order' in straight.stderr and 'ETA:' in straight.stderr


def test_torchrun_trains_with_two_cpu_processes_and_writes_a_checkpoint(tiny_cifar, tmp_path):
    cmd = [PY, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(ROOT / 'train.py')]
    cmd += train_cmd(tiny_cifar, tmp_path, 'ddp', '--epochs', '1', '-b', '6')[2:]
    result = run(cmd, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'process 1 of 2' in result.stderr
    ckpt = load(tmp_path / 'ddp' / 'last.pth.tar')
    assert ckpt['args']['distributed'] is True and ckpt['args']['world_size'] == 2
    assert ckpt['epoch'] == 0 and not any(k.startswith('module.') for k in ckpt['state_dict'])


def test_main_job_script_trains_validates_and_prints_accuracy_and_heatmap(shared_dataset, tmp_path):
    shared_dataset('cifar10')  # the default data of the main job
    env = dict(os.environ, OUT=str(tmp_path / 'out'), EPOCHS='1', TRAIN_PER_CLASS='4', VAL_PER_CLASS='2',
               IMG_SIZE='16', BATCH='8')
    result = subprocess.run(['bash', str(ROOT / 'main_job.sh')], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-3].startswith('main job: 4 templates, 8 learned-mixture layers (reuse 2): top-1 ')
    assert 'the same parameters at 4 layers (reuse 1): top-1 ' in lines[-3]
    moved = re.match(r'mixtures moved: mean entropy ([\d.]+) -> ([\d.]+) nats \(uniform 1.386\); (\d) of 8 layers', lines[-2])
    assert moved and float(moved.group(1)) > 1.2  # a near-uniform start (U(0, 1) logits)
    heatmap = Path(lines[-1].removeprefix('mixture heatmap: '))
    assert heatmap.is_file() and heatmap.parent.parent == tmp_path / 'out'
    bad = subprocess.run(['bash', str(ROOT / 'main_job.sh'), str(tmp_path / 'missing')], capture_output=True,
                         text=True, env=env)
    assert bad.returncode == 2 and 'dataset folder not found' in bad.stderr


# --- configuration precedence -----------------------------------------------------------------------------
def test_command_line_flags_override_a_task_file_which_overrides_the_flags_defaults_as_with_c(tmp_path):
    """timm's rule for -c (command line > file > defaults) holds for --tasks; a -c file sets the defaults."""
    from timm_isomix.tasks.train_tasks import config_from_flags
    from timm_isomix.train.config import command_line_flags, parse_train_args
    tasks = tmp_path / 'tasks.yaml'
    tasks.write_text('epochs: 4\nseed: 5\nmodel_kwargs: {width: 16}\ntasks: [{name: a, data: x, classes: 2}]\n')
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text('epochs: 7\nlr: 0.01\nbatch_size: 16\n')

    def config(*argv):
        argv = ['--tasks', str(tasks), *argv]
        return config_from_flags(parse_train_args(argv)[0], command_line_flags(argv))
    assert (config().epochs, config().seed, config().batch_size) == (4, 5, 128)  # the file, then train.py's defaults
    assert (config('--epochs', '2', '--seed', '1').epochs, config('--seed', '1').seed) == (2, 1)  # the command line
    c = config('-c', str(recipe))  # -c sets defaults: below the task file, above train.py's own
    assert (c.epochs, c.lr, c.batch_size) == (4, 0.01, 16)
    assert config('-c', str(recipe), '-b', '8').batch_size == 8
    assert config('--model-kwargs', 'width=32', 'depth=4').model_kwargs == {'width': 32, 'depth': 4}
    assert command_line_flags(['-c', str(recipe), '--epochs', '3', 'some/dir']) == {'epochs', 'data', 'data_dir'}
