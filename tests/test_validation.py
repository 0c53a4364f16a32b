"""validate.py: checkpoints rebuild their own model and reproduce train.py's eval; bulk runs; JSON and CSV."""
import csv
import json
import os
import subprocess
import sys

import pytest
import timm
import torch

from helpers import ROOT, hub_cache_entry, load_script, make_tiny_folder

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
    assert validate_script.main(['--checkpoint', str(run), '--use-ema', '--data-dir', str(data), '--split', 'val',
                                 '-j', '0', '--results-file', str(out)]) == 0
    rows = {os.path.basename(r['checkpoint']): r for r in csv.DictReader(out.open())}
    assert sorted(rows) == ['checkpoint-0.pth.tar', 'checkpoint-1.pth.tar', 'last.pth.tar', 'model_best.pth.tar']
    for name, row in rows.items():  # each row is its own file's weights: train.py's evaluation of that epoch
        stored = torch.load(run / name, map_location='cpu', weights_only=True)['results']
        assert float(row['top1']) == pytest.approx(stored['top1'], abs=1e-3), name
        assert float(row['loss']) == pytest.approx(stored['loss'], abs=1e-5), name
    # the two epochs' weights differ, so the rows above could not match by reading one file twice
    assert abs(float(rows['checkpoint-0.pth.tar']['loss']) - float(rows['checkpoint-1.pth.tar']['loss'])) > 1e-4


@pytest.fixture
def resnet18_on_the_hub(tmp_path, monkeypatch):
    """timm's resnet18 tags (a1_in1k, tv_in1k) as an offline Hugging Face cache holding stand-in weights
    (random, with non-trivial BN statistics)."""
    import huggingface_hub.constants as hf_constants
    from safetensors.torch import save_file
    torch.manual_seed(0)
    resnet = timm.create_model('resnet18')
    with torch.no_grad():
        for m in resnet.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.2)
    for tag in ('a1_in1k', 'tv_in1k'):
        snapshot = hub_cache_entry(tmp_path / 'hub', f'timm/resnet18.{tag}')
        save_file(resnet.state_dict(), str(snapshot / 'model.safetensors'))
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)


def _validate(data, tmp_path, model, name):
    out = tmp_path / f'{name}.json'
    assert validate_script.main(['--model', model, '--data-dir', str(data), '--split', 'val', '--img-size', '32',
                                 '-j', '0', '--results-file', str(out), '--results-format', 'json']) == 0
    return json.loads(out.read_text())


def _numbers(row):
    return row['top1'], row['top5'], row['loss']


def test_without_a_checkpoint_a_model_is_validated_with_its_pretrained_weights(trained, resnet18_on_the_hub, tmp_path):
    """As timm's validate.py: --pretrained is implied. The warm-start tag computes its source ResNet exactly,
    so isomix_resnet18 (its default tag, a1_in1k) validates to the very numbers of timm's resnet18.a1_in1k."""
    data, _ = trained
    (isomix,) = _validate(data, tmp_path, 'isomix_resnet18', 'isomix')
    (resnet,) = _validate(data, tmp_path, 'resnet18.a1_in1k', 'resnet')
    assert _numbers(isomix) == _numbers(resnet)  # two random initialisations would not agree


def test_a_model_name_pattern_validates_the_matching_models_with_pretrained_weights(trained, resnet18_on_the_hub,
                                                                                   tmp_path):
    data, _ = trained
    rows = _validate(data, tmp_path, 'isomix_resnet18*', 'bulk')
    assert [r['model'] for r in rows] == ['isomix_resnet18.a1_in1k', 'isomix_resnet18.tv_in1k']  # the tags
    assert all(r['samples'] == 30 and 'error' not in r for r in rows)
    (resnet,) = _validate(data, tmp_path, 'resnet18.tv_in1k', 'resnet')  # its own preprocessing (bilinear, 0.875)
    assert _numbers(rows[1]) == _numbers(resnet)


def test_use_ema_without_ema_weights_is_an_error(trained, tmp_path, capsys):
    data, run = trained
    ckpt = torch.load(run / 'last.pth.tar', map_location='cpu', weights_only=True)
    del ckpt['state_dict_ema']
    torch.save(ckpt, tmp_path / 'no_ema.pth.tar')
    assert validate_script.main(['--checkpoint', str(tmp_path / 'no_ema.pth.tar'), '--use-ema',
                                 '--data-dir', str(data), '--split', 'val', '-j', '0']) == 2
    assert "has no 'state_dict_ema'" in capsys.readouterr().err
