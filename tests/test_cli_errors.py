"""Bad input to train.py, validate.py and the study runner: one line naming the problem and what was expected,
exit status 2, no traceback, no checkpoint lost."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, load_script, make_tiny_folder

train_script, validate_script = load_script('train'), load_script('validate')


@pytest.fixture(scope='module')
def tiny(shared_dataset, tmp_path_factory):
    """A few real CIFAR-10 images as an ImageFolder, and a real 1-epoch checkpoint trained on them."""
    src, root = shared_dataset('cifar10'), tmp_path_factory.mktemp('tiny_cli')
    data = make_tiny_folder(src, root / 'data', 4, 2)
    code = train_script.main(base(data, root / 'runs', 'first') + ['--epochs', '1'])
    assert code == 0
    return data, root / 'runs', root / 'runs' / 'first' / 'last.pth.tar'


def base(data, out, experiment):
    return ['--data-dir', str(data), '--model', 'isomix_iso_64_8_p2', '--img-size', '16', '-b', '8', '-j', '0',
            '--epochs', '1', '--warmup-epochs', '0', '--val-split', 'val', '--device', 'cpu',
            '--output', str(out), '--experiment', experiment]


def error_of(main, argv, capsys) -> str:
    """Run a script's main(); it must fail with exit status 2 and exactly one stderr line (returned)."""
    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(err) == 1, err
    return err[0]


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_missing_data_directory_is_named(tiny, tmp_path, capsys):
    data, out, _ = tiny
    err = error_of(train_script.main, base(tmp_path / 'nowhere', out, 'x'), capsys)
    assert err == f'train.py: error: data directory not found: {tmp_path / "nowhere"}'


def test_unknown_model_is_named(tiny, capsys):
    data, out, _ = tiny
    argv = base(data, out, 'x')
    argv[argv.index('isomix_iso_64_8_p2')] = 'isomix_nonexistent'
    assert "unknown model 'isomix_nonexistent'" in error_of(train_script.main, argv, capsys)


def test_resume_of_another_architecture_is_refused_and_the_checkpoint_kept(tiny, capsys):
    data, out, ckpt = tiny
    before = digest(ckpt)
    argv = base(data, out, 'first') + ['--resume', str(ckpt)]
    argv[argv.index('isomix_iso_64_8_p2')] = 'isomix_resnet18'
    err = error_of(train_script.main, argv, capsys)
    assert "holds a 'isomix_iso_64_8_p2' checkpoint, but --model is 'isomix_resnet18'" in err
    assert digest(ckpt) == before


def test_num_classes_contradicting_the_checkpoint_is_refused(tiny, capsys):
    data, out, ckpt = tiny
    before = digest(ckpt)
    err = error_of(train_script.main, base(data, out, 'first') + ['--resume', str(ckpt), '--num-classes', '7'], capsys)
    assert '--num-classes 7 contradicts --resume' in err and 'which has 10 classes' in err
    assert digest(ckpt) == before


def test_unwritable_output_directory_is_named(tiny, tmp_path, capsys):
    data, _, _ = tiny
    blocker = tmp_path / 'a-file'
    blocker.write_text('not a folder')
    err = error_of(train_script.main, base(data, blocker / 'sub', 'x'), capsys)
    assert err.startswith(f'train.py: error: cannot write to output directory {blocker / "sub" / "x"}')


def test_existing_experiment_directory_is_never_overwritten_without_resume_or_flag(tiny, capsys):
    data, out, ckpt = tiny
    before = digest(ckpt)
    err = error_of(train_script.main, base(data, out, 'first'), capsys)
    assert f'experiment directory {out / "first"} already exists' in err and '--resume' in err
    assert digest(ckpt) == before


def test_unknown_yaml_key_and_wrongly_typed_value_are_reported(tiny, tmp_path, capsys):
    data, out, _ = tiny
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('model: isomix_iso_64_8_p2\nlearning_rate: 0.1\n')
    assert "unknown key 'learning_rate'" in error_of(train_script.main, ['-c', str(cfg)] + base(data, out, 'y'), capsys)
    cfg.write_text('epochs: ten\n')
    assert "key 'epochs' must be an integer, got 'ten'" in error_of(
        train_script.main, ['-c', str(cfg)] + base(data, out, 'y'), capsys)
    cfg.write_text('scale: 0.5\n')
    assert "key 'scale' must be a list of numbers" in error_of(
        train_script.main, ['-c', str(cfg)] + base(data, out, 'y'), capsys)


def test_timm_recipe_keys_are_accepted(tiny):
    from timm_isomix.train.config import INERT_KEYS, ConfigError, build_train_parser, check_config, load_config
    parser = build_train_parser()
    for recipe in ('isomix_resnet50_in1k', 'isomix_resnet50_ft_from_resnet50', 'isomix_resnet18_imagenette128',
                   'isomix_iso_cifar10'):
        check_config(load_config(str(ROOT / 'hparams' / f'{recipe}.yaml')), parser, recipe)
    # a run's own args.yaml (it names its config file) configures a new run
    _, out, _ = tiny
    assert check_config(load_config(str(out / 'first' / 'args.yaml')), parser)['model'] == 'isomix_iso_64_8_p2'
    # keys of timm's train.py whose feature this trainer lacks pass at timm's default, which leaves it off
    assert check_config({**INERT_KEYS, 'batch_size': 64}, parser) == {'batch_size': 64}
    with pytest.raises(ConfigError, match="'apex_amp'=True is not supported"):
        check_config({'apex_amp': True}, parser)
    with pytest.raises(ConfigError, match="'kd_model_name'='resnet50' is not supported"):
        check_config({'kd_model_name': 'resnet50'}, parser)


def test_yaml_values_are_converted_as_timms_argparse_converts_them():
    from timm_isomix.train.config import build_train_parser, check_config
    # PyYAML reads 3e-4 as a string; timm's train.py gets a float through argparse, and so does this one
    assert check_config({'lr': '3e-4', 'warmup_epochs': 5.0, 'scale': ['0.5', 1]}, build_train_parser()) == {
        'lr': 3e-4, 'warmup_epochs': 5, 'scale': [0.5, 1]}


def test_validate_names_a_missing_checkpoint_and_a_contradicting_model(tiny, tmp_path, capsys):
    data, _, ckpt = tiny
    err = error_of(validate_script.main, ['--checkpoint', str(tmp_path / 'no.pth.tar'), '--data-dir', str(data)], capsys)
    assert err == f'validate.py: error: checkpoint not found: {tmp_path / "no.pth.tar"}'
    err = error_of(validate_script.main, ['--checkpoint', str(ckpt), '--model', 'isomix_resnet18',
                                          '--data-dir', str(data)], capsys)
    assert "holds a 'isomix_iso_64_8_p2' model, but --model is 'isomix_resnet18'" in err


def test_cli_exit_status_is_non_zero_in_a_real_process(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / 'train.py'), '--data-dir', str(tmp_path / 'none')],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f'train.py: error: data directory not found: {tmp_path / "none"}']


# --- every CLI, in a real process: one line naming what was wrong and what was expected, exit status 2 ---------
def one_line_error(args, **kwargs) -> str:
    """Run `python ARGS` from the checkout: exit status 2, one stderr line and no traceback (returned)."""
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, **kwargs)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr and len(lines) == 1, lines
    return lines[0]


def test_train_py_names_a_model_kwarg_the_model_cannot_use(tiny, tmp_path):
    data, _, _ = tiny
    err = one_line_error(['train.py', '--data-dir', data, '--model', 'isomix_resnet18', '--num-classes', '10',
                          '--device', 'cpu', '--output', tmp_path, '--model-kwargs', 'reuse=abc'])
    assert err == ("train.py: error: model 'isomix_resnet18' cannot be built with --model-kwargs {'reuse': 'abc'}: "
                   "invalid literal for int() with base 10: 'abc'")
    err = one_line_error(['train.py', '--model-kwargs', 'reuse'])
    assert err == "train.py: error: argument --model-kwargs: expected key=value items, got 'reuse'"


def test_train_py_names_a_task_file_that_is_missing_not_yaml_or_wrongly_typed(tmp_path):
    missing = tmp_path / 'none.yaml'
    assert one_line_error(['train.py', '--tasks', missing]) == \
        f'train.py: error: --tasks {missing}: task file {missing} does not exist'
    broken = tmp_path / 'broken.yaml'
    broken.write_text('tasks: [{name: a, data: x, classes: 2}\nepochs: 2\n')
    err = one_line_error(['train.py', '--tasks', broken])
    assert err.startswith(f'train.py: error: --tasks {broken}: task file {broken} is not valid YAML: ')
    assert 'at line 2, column' in err
    typed = tmp_path / 'typed.yaml'
    typed.write_text('epochs: ten\ntasks: [{name: a, data: x, classes: 2}]\n')
    assert one_line_error(['train.py', '--tasks', typed]) == \
        f"train.py: error: --tasks {typed}: {typed}: 'epochs' must be an integer, got 'ten'"


def test_train_py_names_a_config_file_that_is_not_yaml_and_a_flag_of_the_wrong_type(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('model: isomix_iso_64_8_p2\n  epochs: 3\n')
    err = one_line_error(['train.py', '-c', cfg])
    assert err.startswith(f'train.py: error: config file {cfg} is not valid YAML: mapping values are not allowed')
    assert one_line_error(['train.py', '--epochs', 'ten']) == "train.py: error: argument --epochs: invalid int value: 'ten'"


def test_validate_py_names_a_missing_checkpoint_and_a_model_kwarg_the_model_cannot_use(tiny, tmp_path):
    data, _, ckpt = tiny
    assert one_line_error(['validate.py', '--checkpoint', tmp_path / 'no.pth.tar', '--data-dir', data]) == \
        f'validate.py: error: checkpoint not found: {tmp_path / "no.pth.tar"}'
    err = one_line_error(['validate.py', '--checkpoint', ckpt, '--data-dir', data, '--split', 'val', '--device', 'cpu',
                          '--model-kwargs', 'reuse=abc'])
    assert err.startswith("validate.py: error: model 'isomix_iso_64_8_p2' cannot be built with {")
    assert err.endswith("'reuse': 'abc'}: invalid literal for int() with base 10: 'abc'")


@pytest.mark.parametrize('argv,expected', [
    (['run', 'no-such-study'], "unknown study 'no-such-study'; studies: "),
    (['run', 'reuse-cifar10', '--epochs', 'ten'], "argument --epochs: expected a whole number of at least 1, got 'ten'"),
    (['run', 'reuse-cifar10', '--train-limit', 'abc'],
     "argument --train-limit: expected a number of images (at least 1) or 'all', got 'abc'"),
], ids=['unknown-study', 'epochs', 'train-limit'])
def test_the_study_runner_names_an_unknown_study_and_a_bad_scale(argv, expected, tmp_path):
    env = dict(os.environ, ISOMIX_RESULTS=str(tmp_path / 'results'), ISOMIX_STATE=str(tmp_path / 'state'))
    assert one_line_error(['-m', 'experiments', *argv], env=env).startswith(f'experiments: error: {expected}')
