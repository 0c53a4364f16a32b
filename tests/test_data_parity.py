"""Data and loading as timm's own train.py and validate.py do them: images read in the mode the resolved data
config asks for (a grayscale folder trains an RGB model), input channels from --input-size, checkpoints of a
compiled run loadable, in one process and under torchrun."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from helpers import ROOT, load_script, make_tiny_folder
from timm_isomix.train.run import input_chans, input_img_mode

train_script, validate_script = load_script('train'), load_script('validate')


@pytest.fixture(scope='module')
def usps(shared_dataset, tmp_path_factory):
    """Real USPS digits (grayscale PNGs, 16 px): 4 train and 2 val images per class."""
    return make_tiny_folder(shared_dataset('usps'), tmp_path_factory.mktemp('usps'), 4, 2)


def _train_args(data, out, experiment, *extra):
    return ['--data-dir', str(data), '--model', 'isomix_iso_64_8_p2', '--img-size', '16', '-b', '8', '-j', '0',
            '--epochs', '1', '--warmup-epochs', '0', '--val-split', 'val', '--device', 'cpu',
            '--output', str(out), '--experiment', experiment, *extra]


def _validate(ckpt, data, out):
    assert validate_script.main(['--checkpoint', str(ckpt), '--data-dir', str(data), '--split', 'val', '-j', '0',
                                 '--results-file', str(out), '--results-format', 'json']) == 0
    return json.loads(out.read_text())[0]


def test_the_folder_is_grayscale(usps):
    image = next(p for p in sorted((usps / 'train').rglob('*')) if p.is_file())
    assert Image.open(image).mode == 'L'  # the premise of the tests below


@pytest.mark.parametrize('channels, mode, explicit', [(3, 'RGB', None), (1, 'L', None), (4, 'L', None),
                                                      (3, 'RGBA', 'RGBA')])
def test_images_are_read_in_the_mode_of_the_resolved_channel_count(channels, mode, explicit):
    args = argparse.Namespace(input_img_mode=explicit)
    assert input_img_mode(args, {'input_size': (channels, 32, 32)}) == mode


def test_input_channels_come_from_in_chans_else_from_input_size():
    assert input_chans(argparse.Namespace(in_chans=None, input_size=[1, 16, 16])) == 1
    assert input_chans(argparse.Namespace(in_chans=2, input_size=[1, 16, 16])) == 2
    assert input_chans(argparse.Namespace(in_chans=None, input_size=None)) is None


def test_train_py_trains_an_rgb_model_on_a_grayscale_folder_and_validate_py_evaluates_it(usps, tmp_path):
    assert train_script.main(_train_args(usps, tmp_path, 'rgb')) == 0
    ckpt = torch.load(tmp_path / 'rgb' / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['model_args']['in_chans'] == 3 and ckpt['data_config']['input_size'] == [3, 16, 16]
    row = _validate(tmp_path / 'rgb' / 'last.pth.tar', usps, tmp_path / 'r.json')
    assert row['samples'] == 20 and row['top1'] == pytest.approx(ckpt['results']['top1'], abs=1e-3)


def test_an_input_size_of_one_channel_builds_a_one_channel_model_reading_grayscale(usps, tmp_path):
    argv = _train_args(usps, tmp_path, 'gray')
    # as with timm's train.py, a one-channel model needs one-channel normalisation (one value is repeated)
    argv[argv.index('--img-size'):argv.index('--img-size') + 2] = ['--input-size', '1', '16', '16',
                                                                   '--mean', '0.5', '--std', '0.25']
    assert train_script.main(argv) == 0
    ckpt = torch.load(tmp_path / 'gray' / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['model_args']['in_chans'] == 1 and ckpt['state_dict']['stem.conv.weight'].shape[1] == 1
    assert _validate(tmp_path / 'gray' / 'last.pth.tar', usps, tmp_path / 'r.json')['samples'] == 20


def test_torchrun_two_processes_train_on_the_grayscale_folder(usps, tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(ROOT / 'train.py')]
    cmd += _train_args(usps, tmp_path, 'ddp', '-b', '4')
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(tmp_path / 'ddp' / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['args']['world_size'] == 2 and ckpt['epoch'] == 0


def test_a_compiled_run_writes_checkpoints_of_the_plain_model(usps, tmp_path):
    """--torchcompile compiles before DDP, as timm; the checkpoint keys are the model's own (no `_orig_mod.`),
    so validate.py and --resume load it."""
    assert train_script.main(_train_args(usps, tmp_path, 'compiled', '--torchcompile', 'eager', '--model-ema')) == 0
    ckpt = torch.load(tmp_path / 'compiled' / 'last.pth.tar', map_location='cpu', weights_only=True)
    for key in ('state_dict', 'state_dict_ema'):
        assert not [k for k in ckpt[key] if k.startswith('_orig_mod.')], key
    assert _validate(tmp_path / 'compiled' / 'last.pth.tar', usps, tmp_path / 'r.json')['samples'] == 20
