"""validate.py: checkpoints rebuild their own model and reproduce train.py's eval; bulk runs; JSON and CSV."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, load_script, make_tiny_folder

train_script, validate_script = load_script('train'), load_script('validate')


@pytest.fixture(scope='module')
def trained(shared_dataset, tmp_path_factory):
    """Real CIFAR-10 images (6 / 3 per class) and a 2-epoch run of a non-default schedule (depth 4) with EMA."""
    src, root = shared_dataset('cifar10'), tmp_path_factory.mktemp('tiny_val')
    data = make_tiny_folder(src, root / 'data', 6, 3)
    code = train_script.main([
        '--data-dir', str(data), '--model', 'isomix_iso_64_8_p2', '--model-kwargs', 'depth=4', '--img-size', '16',
        '-b', '10', '-j', '0', '--epochs', '2', '--warmup-epochs', '0', '--opt', 'adamw', '--lr', '3e-3',
        '--model-ema', '--model-ema-decay', '0.5', '--val-split', 'val', '--device', 'cpu',
        '--output', str(root), '--experiment', 'run'])
    assert code == 0
    return data, root / 'run'


def test_validate_py_rebuilds_the_checkpoint_schedule_and_reproduces_train_eval(trained, tmp_path):
    data, run = trained
    ckpt = torch.load(run / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['model_args']['depth'] == 4
    out = tmp_path / 'r.json'
    result = subprocess.run(
        [sys.executable, str(ROOT / 'validate.py'), '--checkpoint', str(run / 'last.pth.tar'), '--use-ema',
         '--data-dir', str(data), '--split', 'val', '-b', '7', '-j', '0', '--results-file', str(out)],
        capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    row, = json.loads(out.read_text())
    assert row['model'] == 'isomix_iso_64_8_p2' and row['samples'] == 30 and row['img_size'] == 16
    # train.py evaluated the EMA weights (its checkpoint metric); validate.py gets the same numbers
    assert row['top1'] == pytest.approx(ckpt['results']['top1'], abs=1e-3)  # rows are rounded to 4 places
    assert row['top5'] == pytest.approx(ckpt['results']['top5'], abs=1e-3)
    assert f'top-1 {row["top1"]:.2f}  top-5 {row["top5"]:.2f}' in result.stdout


def test_a_checkpoint_folder_is_validated_file_by_file_into_csv(trained, tmp_path, capsys):
    data, run = trained
    out = tmp_path / 'r.csv'
    assert validate_script.main(['--checkpoint', str(run), '--data-dir', str(data), '--split', 'val', '-j', '0',
                                 '--results-file', str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    names = sorted(os.path.basename(r['checkpoint']) for r in rows)
    assert names == ['checkpoint-0.pth.tar', 'checkpoint-1.pth.tar', 'last.pth.tar', 'model_best.pth.tar']
    assert all(0. <= float(r['top1']) <= float(r['top5']) <= 100. for r in rows)
    last = next(r for r in rows if r['checkpoint'].endswith('last.pth.tar'))
    best = next(r for r in rows if r['checkpoint'].endswith('checkpoint-1.pth.tar'))
    assert last['top1'] == best['top1']  # the same weights, read from two files


def test_a_model_name_pattern_validates_every_matching_model(trained, tmp_path, capsys):
    data, _ = trained
    out = tmp_path / 'bulk.json'
    assert validate_script.main(['--model', 'isomix_iso_*_p2', '--num-classes', '10', '--img-size', '16',
                                 '--data-dir', str(data), '--split', 'val', '-j', '0', '--results-file', str(out),
                                 '--results-format', 'json']) == 0
    rows = json.loads(out.read_text())
    assert [r['model'] for r in rows] == ['isomix_iso_64_8_p2', 'isomix_iso_128_16_p2']
    assert all(r['samples'] == 30 for r in rows)


def test_use_ema_without_ema_weights_is_an_error(trained, tmp_path, capsys):
    data, run = trained
    ckpt = torch.load(run / 'last.pth.tar', map_location='cpu', weights_only=True)
    del ckpt['state_dict_ema']
    torch.save(ckpt, tmp_path / 'no_ema.pth.tar')
    assert validate_script.main(['--checkpoint', str(tmp_path / 'no_ema.pth.tar'), '--use-ema',
                                 '--data-dir', str(data), '--split', 'val', '-j', '0']) == 2
    assert "has no 'state_dict_ema'" in capsys.readouterr().err
