"""Full-size presets and experiments/gpu.sh: a study's named scales, stored under their own name with the
preset's configuration changes, and the GPU script's every stage at a tiny size on the CPU (--smoke)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import studies  # noqa: F401  (registers the studies)
from experiments.runner import STUDIES, Scale, Study, merge_config, register

ROOT = Path(__file__).resolve().parent.parent
SMOKE_SCALE = 'full-epochs1-train_limit64-val_limit32-batch_size16-width_mult0.125'


def test_a_preset_scale_is_named_by_the_preset_and_the_fields_overridden_on_top_of_it():
    cpu = Scale(epochs=4, train_limit=15000, val_limit=5000, batch_size=64)
    full = Scale(epochs=25, train_limit=None, val_limit=None, batch_size=512, overrides={'lr': 0.01})
    assert cpu.name(cpu) == 'cpu'
    assert Scale(epochs=15, train_limit=None, val_limit=None, batch_size=64).name(cpu) == \
        'epochs15-train_limitall-val_limitall'  # scales without a preset keep their names
    assert full.name(full, 'full') == 'full'
    assert Scale(epochs=1, train_limit=64, val_limit=None, batch_size=512, overrides=full.overrides).name(full, 'full') \
        == 'full-epochs1-train_limit64'


def test_preset_overrides_merge_into_nested_configuration_dicts_key_by_key():
    config = {'model': 'm', 'model_kwargs': {'width': 48, 'depth': 8}, 'pretrain': {'epochs': 1, 'x': {'a': 1}}}
    merged = merge_config(config, {'model_kwargs': {'width': 128}, 'pretrain': {'x': {'b': 2}}, 'lr': 0.1})
    assert merged == {'model': 'm', 'model_kwargs': {'width': 128, 'depth': 8}, 'lr': 0.1,
                      'pretrain': {'epochs': 1, 'x': {'a': 1, 'b': 2}}}
    assert config['model_kwargs']['width'] == 48  # the study's own configuration is left as it was


def test_every_study_of_the_gpu_script_declares_a_full_preset_on_full_training_sets():
    for name in ('reuse-cifar10', 'reuse-miniimagenet32', 'multitask-digits-cifar10', 'transfer-mnistm',
                 'transfer-cifar10', 'adaptation-mnistm', 'routing-min-mtl', 'mixtures-cifar10'):
        full = STUDIES[name].presets['full']
        assert full.train_limit is None and full.val_limit is None and full.batch_size >= 128, name
    reuse = STUDIES['reuse-cifar10'].presets['full']
    # the same widened trunk at every reuse: only the depth, templates and order differ between configurations
    trunks = {json.dumps({k: v for k, v in merge_config(c, reuse.overrides)['model_kwargs'].items()
                          if k in ('width', 'patch_size')}) for c in STUDIES['reuse-cifar10'].configs.values()}
    assert trunks == {json.dumps({'width': 128, 'patch_size': 2})} and reuse.epochs >= 20


def test_a_preset_name_that_could_read_as_another_scale_is_refused():
    for bad in ('cpu', 'epochs5', 'full-size'):
        with pytest.raises(ValueError, match='preset names'):
            register(Study(name='bad-preset', description='x', configs={'a': {}}, run=lambda *a: {},
                           presets={bad: Scale()}))
    assert 'bad-preset' not in STUDIES


def test_an_unknown_preset_is_a_one_line_error():
    env = dict(os.environ, ISOMIX_RESULTS='/nonexistent/results', ISOMIX_STATE='/nonexistent/state')
    for args in (['run', 'warmstart-miniimagenet32', '--preset', 'huge'],
                 ['report', 'warmstart-miniimagenet32', '--preset', 'huge']):
        out = subprocess.run([sys.executable, '-m', 'experiments', *args], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 2 and "no preset 'huge'; it has ['full']" in out.stderr, out.stderr[-500:]


def test_the_in_memory_loop_takes_channels_last_and_bf16_autocast_from_its_arguments_or_the_environment(
        monkeypatch, one_thread):
    import timm
    import torch
    from torch.utils.data import TensorDataset
    from timm_isomix.tasks.fit import default_precision, fit
    data = TensorDataset(torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,)))
    model = timm.create_model('resnet10t', num_classes=10)
    monkeypatch.setenv('ISOMIX_CHANNELS_LAST', '1')
    monkeypatch.setenv('ISOMIX_AMP', 'bfloat16')
    assert default_precision() == {'amp': 'bfloat16', 'channels_last': True}
    history = fit(model, data, data, epochs=1, batch_size=8, device='cpu')
    assert model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last) and len(history) == 1
    with pytest.raises(ValueError, match='loss scaling'):
        fit(model, data, data, epochs=1, batch_size=8, device='cpu', amp='float16')


@pytest.mark.slow
def test_gpu_script_smoke_runs_every_stage_on_the_cpu_and_writes_results_and_reports(tmp_path, shared_dataset):
    for name in ('cifar10', 'miniimagenet32', 'mnist', 'usps', 'mnistm', 'imagenette128'):
        shared_dataset(name)
    results, state = tmp_path / 'results', tmp_path / 'state'
    env = dict(os.environ, ISOMIX_RESULTS=str(results), ISOMIX_STATE=str(state), PYTHON=sys.executable, INSTALL='0',
               ISOMIX_CACHE=os.environ.get('ISOMIX_CACHE', str(Path.home() / '.cache' / 'timm-isomix' / 'datasets')))
    out = subprocess.run(['bash', str(ROOT / 'experiments' / 'gpu.sh'), os.environ['ISOMIX_DATA'], '--smoke'],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    # the plan and its estimate come before any stage runs
    assert log.index('== plan (smoke)') < log.index('all studies:') < log.index('== benchmark')
    expected = {'reuse-cifar10': ['reuse1', 'reuse2', 'unshared-depth8'], 'reuse-miniimagenet32': ['reuse1'],
                'multitask-digits-cifar10': ['isomix', 'independent'], 'transfer-mnistm': ['mixture', 'linear']}
    for study, configs in expected.items():
        folder = results / study / SMOKE_SCALE
        for config in configs:
            record = json.loads((folder / config / 'seed0.json').read_text())
            assert record['preset'] == 'full' and record['scale'] == SMOKE_SCALE
            kwargs = record['config'].get('pretrain', record['config'])['model_kwargs']
            assert kwargs['patch_size'] == 2 and kwargs['width'] == 128  # the preset's trunk (x0.125 when built)
            assert record['precision']['channels_last'] is True
        assert f'`{configs[0]}`' in (folder / 'report.md').read_text()
        if study.startswith(('multitask', 'transfer')):
            assert (folder / 'sharing.md').is_file()
    bench = json.loads((results / 'benchmark-cpu-smoke.json').read_text())
    assert bench  # the benchmark's report, written by its own --json
    rows = list(csv.DictReader((results / 'timm-train-py' / 'gpu-in1k-recipe-smoke-summary.csv').open()))
    assert rows and 'eval_top1' in rows[0]
    run = json.loads((results / 'gpu-run' / 'smoke' / 'run.json').read_text())
    assert set(run['stages'].values()) == {0} and run['benchmark']['exit'] == 0 and run['device'] == 'cpu'
