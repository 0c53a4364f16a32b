"""The study runner: result files, skipping finished runs, resuming killed ones, reports."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent  # the workspace runs from the checkout's root
TINY = ['--configs', 'random-m10', '--epochs', '3', '--train-limit', '256', '--val-limit', '128', '--threads', '1']
SCALE = 'epochs3-train_limit256-val_limit128'


@pytest.fixture
def env(tmp_path, shared_dataset):
    shared_dataset('cifar10')
    return dict(os.environ, ISOMIX_RESULTS=str(tmp_path / 'results'), ISOMIX_STATE=str(tmp_path / 'state'))


def cli(env, *args, check=True):
    out = subprocess.run([PY, '-m', 'experiments', *args], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    if check:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out


def test_a_run_is_stored_with_its_configuration_versions_time_and_history_and_then_skipped(env, tmp_path):
    cli(env, 'run', 'mixtures-cifar10', '--seeds', '0', *TINY)
    path = tmp_path / 'results' / 'mixtures-cifar10' / SCALE / 'random-m10' / 'seed0.json'
    record = json.loads(path.read_text())
    assert record['config']['model_kwargs']['mixture_init'] == 'random' and record['seed'] == 0
    assert {'torch', 'timm', 'timm_isomix'} <= set(record['versions']) and record['wall_time'] > 0
    assert [h['epoch'] for h in record['history']] == [1, 2, 3]
    assert {'top1', 'params', 'macs', 'alphas', 'moved', 'entropy'} <= set(record['result'])
    again = cli(env, 'run', 'mixtures-cifar10', '--seeds', '0', *TINY)
    assert '0 of 1 runs to do' in again.stdout and json.loads(path.read_text()) == record


def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(env, tmp_path):
    args = ['run', 'mixtures-cifar10', '--seeds', '1', *TINY[:2], '--epochs', '6', *TINY[4:]]
    scale = SCALE.replace('epochs3', 'epochs6')
    state = tmp_path / 'state' / 'mixtures-cifar10' / scale / 'random-m10' / 'seed1' / 'state.pth'
    proc = subprocess.Popen([PY, '-m', 'experiments', *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert state.exists(), 'the run saved no state before it ended'
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = tmp_path / 'results' / 'mixtures-cifar10' / scale / 'random-m10' / 'seed1.json'
    assert not result.exists()
    cli(env, *args)
    resumed = json.loads(result.read_text())
    assert resumed['resumed'] and not state.exists()
    straight_env = dict(env, ISOMIX_RESULTS=str(tmp_path / 'straight'), ISOMIX_STATE=str(tmp_path / 'state2'))
    cli(straight_env, *args)
    straight = json.loads((tmp_path / 'straight' / 'mixtures-cifar10' / scale / 'random-m10' / 'seed1.json').read_text())
    assert not straight['resumed']
    strip = lambda hist: [{k: v for k, v in h.items() if k != 'time'} for h in hist]  # noqa: E731
    assert strip(resumed['history']) == strip(straight['history'])
    assert resumed['result']['alphas'] == straight['result']['alphas']


def test_report_tabulates_mean_std_and_n_and_list_shows_finished_seeds(env, tmp_path):
    cli(env, 'run', 'mixtures-cifar10', '--seeds', '0', '1', *TINY)
    out = cli(env, 'report', 'mixtures-cifar10', '--scale', SCALE)
    folder = tmp_path / 'results' / 'mixtures-cifar10' / SCALE
    text = (folder / 'report.md').read_text()
    assert '| `random-m10` |' in text and ' ± ' in text and '| 2 |' in text
    assert (folder / 'curves.png').is_file() and (folder / 'mixtures.png').is_file()
    rows = json.loads(cli(env, 'report', 'mixtures-cifar10', '--scale', SCALE, '--json').stdout)
    records = [json.loads((folder / 'random-m10' / f'seed{s}.json').read_text())['result']['top1'] for s in (0, 1)]
    assert rows == [{'config': 'random-m10', 'top1_mean': pytest.approx(sum(records) / 2), 'top1_std': rows[0]['top1_std'],
                     'n': 2, 'params': rows[0]['params']}]
    assert rows[0]['top1_std'] == pytest.approx(abs(records[0] - records[1]) / 2 ** 0.5)
    listing = cli(env, 'list').stdout
    assert f'[{SCALE}]' in listing and 'random-m10: seeds [0, 1]' in listing and '| ' not in listing
    assert 'top-1' in out.stdout or '| `random-m10`' in out.stdout


def test_unknown_study_or_configuration_is_a_clear_error(env):
    bad = cli(env, 'run', 'no-such-study', check=False)
    assert bad.returncode != 0 and 'unknown study' in bad.stderr and 'mixtures-cifar10' in bad.stderr
    bad = cli(env, 'run', 'mixtures-cifar10', '--configs', 'nope', '--epochs', '1', check=False)
    assert bad.returncode == 2 and "no configurations ['nope']" in bad.stderr
    bad = cli(env, 'report', 'mixtures-cifar10', '--scale', 'nothing-here', check=False)
    assert bad.returncode == 2 and 'no finished runs' in bad.stderr


def test_a_routing_study_runs_on_min_mtl_and_its_task_report_draws_the_routes(tmp_path, shared_dataset):
    """Tiny MIN-MTL: 20 tasks of 5 classes, 16 images each, 1 step; every task scored; routes reported."""
    shared_dataset('miniimagenet32')
    env = dict(os.environ, ISOMIX_RESULTS=str(tmp_path / 'results'), ISOMIX_STATE=str(tmp_path / 'state'))
    cli(env, 'run', 'routing-min-mtl', '--configs', 'route_input_gumbel', '--seeds', '0', '--epochs', '1',
        '--train-limit', '16', '--val-limit', '10', '--batch-size', '16', '--threads', '1')
    scale = 'epochs1-train_limit16-val_limit10-batch_size16'
    folder = tmp_path / 'results' / 'routing-min-mtl' / scale
    result = json.loads((folder / 'route_input_gumbel' / 'seed0.json').read_text())['result']
    tasks = [f'min{i:02d}' for i in range(20)]
    assert result['num_tasks'] == 20 and all(0 <= result[f'top1_{t}'] <= 100 for t in tasks)
    assert result['top1'] == pytest.approx(sum(result[f'top1_{t}'] for t in tasks) / 20)
    assert list(result['task_routes']) == tasks and len(result['js_per_layer']) == 8
    for routes in (*result['task_routes'].values(), *result['train_routes'].values()):  # frequencies
        assert all(sum(row) == pytest.approx(1.) for row in routes)
    assert len(result['train_route_entropy']) == 8 and all(0 <= h <= 1.3863 for h in result['train_route_entropy'])
    out = subprocess.run([PY, '-m', 'experiments.task_report', 'routing-min-mtl', '--scale', scale],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (folder / 'routes-route_input_gumbel.png').is_file()
    assert '`route_input_gumbel` | js_per_layer' in (folder / 'sharing.md').read_text()


def test_the_sharing_control_splits_task_pairs_into_copies_of_one_dataset_and_different_datasets(tmp_path,
                                                                                                shared_dataset):
    """Tiny run of the control: 8 tasks (4 datasets twice); the 4 copy pairs and 24 other pairs make up all 28."""
    for name in ('mnist', 'usps', 'mnistm', 'cifar10'):
        shared_dataset(name)
    env = dict(os.environ, ISOMIX_RESULTS=str(tmp_path / 'results'), ISOMIX_STATE=str(tmp_path / 'state'))
    cli(env, 'run', 'sharing-control-digits-cifar10', '--seeds', '0', '--train-limit', '32', '--val-limit', '16',
        '--batch-size', '16', '--threads', '1')
    scale = 'train_limit32-val_limit16-batch_size16'
    folder = tmp_path / 'results' / 'sharing-control-digits-cifar10' / scale
    result = json.loads((folder / 'isomix' / 'seed0.json').read_text())['result']
    assert list(result['task_alphas']) == ['mnist', 'mnist_b', 'usps', 'usps_b', 'mnistm', 'mnistm_b',
                                           'cifar10', 'cifar10_b']
    same, cross, every = result['js_same_data'], result['js_cross_data'], result['js_per_layer']
    assert len(same) == len(cross) == len(every) == 8
    for s, c, e in zip(same, cross, every):
        assert e == pytest.approx((4 * s + 24 * c) / 28, abs=1e-5)  # the result files keep 6 decimals
    out = subprocess.run([PY, '-m', 'experiments.task_report', 'sharing-control-digits-cifar10',
                          '--scale', scale], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = (folder / 'sharing.md').read_text()
    assert all(f'`isomix` | {key}' in text for key in ('js_same_data', 'js_cross_data', 'js_data_excess'))
    assert (folder / 'mixtures-isomix-seed0.png').is_file()
