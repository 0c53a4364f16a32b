"""Loading isomix weights: published tags, hf-hub / local-dir / file sources, safety and clear errors.

The round trip at the end goes over real HTTP on 127.0.0.1 only: `python -m timm_isomix.hub.publish` (timm's
push_to_hf_hub) commits through the Hub's commit API (tests/hubserver.py: CommitServer) into a git
repository that olah (a Hub-compatible server from PyPI, offline) serves; a fresh process with its own
HF_HOME and HF_ENDPOINT pointing at olah downloads it through huggingface_hub.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import timm
from safetensors.torch import load_file, save_file

import timm_isomix  # noqa: F401
from timm_isomix import hub
from timm_isomix.hub import publish

from hubserver import OLAH_CLI, CommitServer, OlahHub, write_train_checkpoint


@pytest.fixture(autouse=True)
def no_hub_traffic(monkeypatch):
    """In-process tests never reach a Hub (the round trip runs its own process against the local one)."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    path = write_train_checkpoint(tmp_path_factory.mktemp('run'))
    return torch.load(path, weights_only=True)


@pytest.fixture(scope='module')
def weights(ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp('w') / 'model.safetensors'
    save_file(ckpt['state_dict'], str(path))
    return path


def _load(file, name='isomix_iso_64_8_p2', **kwargs):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **kwargs)


def _same_weights(model, state_dict):
    return all(torch.equal(model.state_dict()[k], v) for k, v in state_dict.items())


# --- published tags ----------------------------------------------------------------------------
def test_published_tags_are_listed_after_the_untagged_cfg_and_name_the_default_org():
    assert 'isomix_iso_64_8_p4.cifar10' in timm.list_models('isomix_iso_64_8_p4', include_tags=True)
    cfg = timm.models.get_pretrained_cfg('isomix_iso_64_8_p4.cifar10')
    assert cfg.hf_hub_id == f'{hub.DEFAULT_ORG}/isomix_iso_64_8_p4.cifar10' and cfg.num_classes == 10


def test_published_repo_id_follows_the_org_environment_variable(monkeypatch):
    monkeypatch.setenv(hub.ORG_ENV, 'my-lab')
    assert hub.published_repo_id('isomix_iso_64_8_p2', 'cifar10') == 'my-lab/isomix_iso_64_8_p2.cifar10'


def test_an_unpublished_tag_names_the_org_set_after_import_and_the_publish_command(monkeypatch):
    asked = []
    monkeypatch.setattr('timm_isomix.models._hub._hub_download',
                        lambda repo_id, filename, cache_dir: asked.append((repo_id, filename)))
    monkeypatch.setenv(hub.ORG_ENV, 'my-lab')
    with pytest.raises(hub.WeightsNotPublishedError,
                       match=r'weights of my-lab/isomix_iso_64_8_p4.cifar10 are not published.*'
                             r'`python -m timm_isomix.hub.publish CHECKPOINT --repo-id my-lab/isomix_iso_64_8_p4.cifar10`'):
        timm.create_model('isomix_iso_64_8_p4.cifar10', pretrained=True)
    # the weight files timm looks for, safetensors first, all in the org set after import
    assert asked == [('my-lab/isomix_iso_64_8_p4.cifar10', name)
                     for name in ('model.safetensors', 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth')]


def test_a_model_without_any_weights_says_so_and_lists_the_ways_to_load():
    with pytest.raises(hub.PretrainedWeightsError, match='has no pretrained weights.*hf-hub:ORG/NAME'):
        timm.create_model('isomix_iso_192_12_p14', pretrained=True)


# --- files and folders --------------------------------------------------------------------------
def test_safetensors_file_loads_identical_weights_and_a_new_classifier_size_still_loads(weights, ckpt):
    assert _same_weights(_load(weights), ckpt['state_dict'])
    model = _load(weights, num_classes=3)
    assert model.num_classes == 3
    assert _same_weights(model, {k: v for k, v in ckpt['state_dict'].items() if not k.startswith('head.')})


class _RunsCodeWhenUnpickled:
    """An object only a full unpickle rebuilds (its class is looked up and called): what weights_only refuses."""


def test_pickled_state_dicts_load_as_timm_loads_them_with_weights_only(ckpt, tmp_path):
    for name, content in (('weights.pth', ckpt['state_dict']), ('ckpt.pth.tar', {'state_dict': ckpt['state_dict']})):
        torch.save(content, tmp_path / name)
        assert _same_weights(_load(tmp_path / name), ckpt['state_dict'])


def test_a_pickle_that_needs_a_full_unpickle_is_refused_naming_the_file(ckpt, tmp_path):
    path = tmp_path / 'weights.pth'
    torch.save({'state_dict': ckpt['state_dict'], 'extra': _RunsCodeWhenUnpickled()}, path)
    with pytest.raises(hub.PickledWeightsError, match=f'{path}: .*only a full unpickle.*refused'):
        _load(path)


def test_a_checkpoint_written_by_timms_train_py_loads_as_timm_loads_it(ckpt, tmp_path):
    """timm's CheckpointSaver (what timm's train.py writes) stores its args as an argparse.Namespace, which
    timm's loader allows beside tensors: so do the pretrained loader, train.py / validate.py and publish."""
    import argparse
    from timm.utils import CheckpointSaver
    from timm_isomix.train.checkpoint import load_checkpoint_file
    model = timm.create_model('isomix_iso_64_8_p2')
    model.load_state_dict(ckpt['state_dict'])
    args = argparse.Namespace(model='isomix_iso_64_8_p2', lr=0.1)
    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), args=args, checkpoint_dir=str(tmp_path))
    saver.save_checkpoint(epoch=0, metric=1.0)
    path = tmp_path / 'last.pth.tar'
    assert isinstance(torch.load(path, weights_only=False)['args'], argparse.Namespace)  # the premise
    assert _same_weights(_load(path), ckpt['state_dict'])
    assert load_checkpoint_file(str(path))['arch'] == 'isomix_iso_64_8_p2'
    assert publish.load_train_checkpoint(str(path))['args'] == {'model': 'isomix_iso_64_8_p2', 'lr': 0.1}


def test_save_for_hf_with_timms_defaults_round_trips_through_local_dir(tmp_path):
    """timm's save_for_hf writes pytorch_model.bin by default; timm's local-dir: loader reads it back."""
    for name in ('isomix_iso_64_8_p2', 'isomix_resnet18'):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=7, zero_init_last=False).eval()
        folder = tmp_path / name
        timm.models.save_for_hf(model, str(folder))
        assert (folder / 'pytorch_model.bin').is_file() and not (folder / 'model.safetensors').exists()
        loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
        assert loaded.schedule_args() == model.schedule_args()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))


def test_a_truncated_weight_file_is_named_with_the_problem(weights, tmp_path):
    path = tmp_path / 'model.safetensors'
    data = weights.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(hub.PretrainedWeightsError, match=f'{path}: .*truncated or corrupted'):
        _load(path)


def test_a_corrupted_header_is_named_with_the_problem(weights, tmp_path):
    path = tmp_path / 'model.safetensors'
    data = bytearray(weights.read_bytes())
    data[8:40] = b'#' * 32  # the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(hub.PretrainedWeightsError, match=f'{path}: not a valid safetensors file'):
        _load(path)


def test_weights_of_another_architecture_are_named_with_the_mismatch(weights):
    with pytest.raises(hub.PretrainedWeightsError,
                       match=f'{weights}: the weights do not fit isomix_iso_128_16_p2.*shape mismatches.*bank.weight'):
        _load(weights, 'isomix_iso_128_16_p2')
    with pytest.raises(hub.PretrainedWeightsError, match=f'{weights}: the weights do not fit isomix_resnet18'):
        _load(weights, 'isomix_resnet18', num_classes=10)


def test_a_resnet_of_another_depth_for_a_warm_start_tag_is_named_with_the_mismatch(tmp_path):
    path = tmp_path / 'resnet34.safetensors'
    save_file(timm.create_model('resnet34').state_dict(), str(path))
    with pytest.raises(hub.PretrainedWeightsError, match=f'{path}: state dict is not a timm ResNet matching'):
        _load(path, 'isomix_resnet18.a1_in1k')


def test_weights_of_another_schedule_are_named_with_the_missing_layers(weights):
    with pytest.raises(hub.PretrainedWeightsError,
                       match=r"do not fit isomix_iso_64_8_p2 with schedule \{'depth': 12\}.*missing keys: \[schedule.layers.10"):
        _load(weights, depth=12)


# --- the round trip over HTTP ------------------------------------------------------------------
LOADER = textwrap.dedent('''
    import json, sys, torch, timm
    import timm_isomix
    from safetensors.torch import save_file
    from timm_isomix import hub
    out, report = {}, {}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for key, name in (('hf_hub', 'hf-hub:acme/isomix_iso_64_8_p4.cifar10'), ('tag', 'isomix_iso_64_8_p4.cifar10'),
                      ('pickled', 'hf-hub:acme/pickled')):
        model = timm.create_model(name, pretrained=True).eval()
        report[key] = dict(schedule=model.schedule_args(), mean=list(model.pretrained_cfg['mean']),
                           file=model.pretrained_cfg['file'])
        out.update({f'{key}/{k}': v.contiguous() for k, v in model.state_dict().items()})
        with torch.no_grad():
            out[f'{key}/output'] = model(x)
    for key, name in (('unpublished', 'isomix_iso_64_8_p4.miniimagenet32'), ('unsafe', 'hf-hub:acme/unsafe')):
        try:
            timm.create_model(name, pretrained=True)
            report[key] = 'loaded'
        except hub.PretrainedWeightsError as e:
            report[key] = f'{type(e).__name__}: {e}'
    save_file(out, sys.argv[1])
    print(json.dumps(report))
''')


@pytest.fixture(scope='module')
def olah(tmp_path_factory):
    if not OLAH_CLI.is_file():
        pytest.skip('olah is not installed (pip install -e .[test])')
    server = OlahHub(tmp_path_factory.mktemp('olah')).start(timeout=90)
    yield server
    server.stop()


def _env(tmp_path, endpoint, **extra):
    """A clean huggingface_hub environment: this endpoint, a fresh HF_HOME and cache, nothing inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGINGFACE_', 'TIMM_ISOMIX_'))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / 'hf-home'), HF_HUB_CACHE=str(tmp_path / 'hf-cache'),
               HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_DOWNLOAD_TIMEOUT='30', TORCH_HOME=str(tmp_path / 'torch'),
               NO_PROXY='127.0.0.1', no_proxy='127.0.0.1', **extra)
    return env


def test_publish_serve_and_load_over_http_give_identical_weights_and_outputs(olah, tmp_path):
    # published with a schedule other than the registry default (12 layers, not 8): the tag must read config.json
    ckpt_path = write_train_checkpoint(tmp_path / 'run', arch='isomix_iso_64_8_p4', depth=12)
    ckpt = torch.load(ckpt_path, weights_only=True)
    commits = CommitServer(olah).start()
    try:
        res = subprocess.run(
            [sys.executable, '-m', 'timm_isomix.hub.publish', str(ckpt_path), '--repo-id', 'acme/isomix_iso_64_8_p4.cifar10'],
            env=_env(tmp_path / 'publisher', commits.endpoint, HF_TOKEN='hf_local_test'),
            capture_output=True, text=True, timeout=240)
    finally:
        commits.stop()
    assert res.returncode == 0, res.stderr[-3000:]
    assert f'{commits.endpoint}/acme/isomix_iso_64_8_p4.cifar10/commit/' in res.stdout
    repo = olah.mirrors / 'models' / 'acme' / 'isomix_iso_64_8_p4.cifar10'
    assert sorted(p.name for p in repo.iterdir() if p.name != '.git') == [
        'README.md', 'config.json', 'mixtures.png', 'model.safetensors']
    pickled = tmp_path / 'pickled'
    pickled.mkdir()
    torch.save(ckpt['state_dict'], pickled / 'pytorch_model.bin')
    shutil.copyfile(repo / 'config.json', pickled / 'config.json')
    olah.commit_folder('acme/pickled', pickled)  # timm's save_for_hf default: pytorch_model.bin
    unsafe = tmp_path / 'unsafe'
    unsafe.mkdir()
    torch.save({'state_dict': ckpt['state_dict'], 'extra': _RunsCodeWhenUnpickled()}, unsafe / 'pytorch_model.bin')
    shutil.copyfile(repo / 'config.json', unsafe / 'config.json')
    olah.commit_folder('acme/unsafe', unsafe)

    out = tmp_path / 'loaded.safetensors'
    res = subprocess.run([sys.executable, '-c', LOADER, str(out)], env=_env(tmp_path, olah.endpoint, TIMM_ISOMIX_HUB_ORG='acme'),
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    loaded = load_file(out)

    reference = publish.rebuild_model(ckpt)
    with torch.no_grad():
        expected = reference(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    for key in ('hf_hub', 'tag', 'pickled'):
        assert report[key]['schedule'] == {'depth': 12}
        assert report[key]['mean'] == ckpt['data_config']['mean']
        assert report[key]['file'].startswith(str(tmp_path / 'hf-cache'))  # downloaded, into the fresh cache
        assert all(torch.equal(loaded[f'{key}/{k}'], v) for k, v in ckpt['state_dict'].items())
        assert torch.equal(loaded[f'{key}/output'], expected)
    assert report['unpublished'].startswith('WeightsNotPublishedError: the weights of acme/isomix_iso_64_8_p4.miniimagenet32 '
                                            'are not published')
    assert 'python -m timm_isomix.hub.publish CHECKPOINT --repo-id acme/isomix_iso_64_8_p4.miniimagenet32' in report['unpublished']
    assert report['unsafe'].startswith('PickledWeightsError: ') and 'pytorch_model.bin' in report['unsafe']
    assert 'only a full unpickle' in report['unsafe'] and '(from acme/unsafe)' in report['unsafe']


# --- task adapters over HTTP ---------------------------------------------------------------------
ADAPTER_LOADER = textwrap.dedent('''
    import json, sys, torch, timm
    import timm_isomix
    from safetensors.torch import load_file
    from timm_isomix import hub
    backbone = timm.create_model('isomix_iso_64_8_p2', num_classes=0, width=8, depth=4, num_templates=2, patch_size=4)
    backbone.load_state_dict(load_file(sys.argv[1]))
    model = timm_isomix.MultiTaskIsoMix(backbone, {})
    model.load_task('hf-hub:acme/shades-adapter')
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.save(model.eval()(x, task='shades'), sys.argv[2])
    try:
        model.load_task('hf-hub:acme/no-such-adapter')
        report = 'loaded'
    except hub.PretrainedWeightsError as e:
        report = f'{type(e).__name__}: {e}'
    print(json.dumps({'missing': report, 'label_names': model.task_info['shades']['label_names']}))
''')


def test_publish_a_task_adapter_serve_and_load_it_onto_its_backbone_over_http(olah, tmp_path):
    torch.manual_seed(0)
    backbone = timm.create_model('isomix_iso_64_8_p2', num_classes=0, width=8, depth=4, num_templates=2, patch_size=4)
    save_file(backbone.state_dict(), str(tmp_path / 'backbone.safetensors'))
    model = timm_isomix.MultiTaskIsoMix(backbone, {})
    model.add_task('shades', 3, patch=True)
    with torch.no_grad():
        for p in model.tasks['shades'].parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_task('shades', tmp_path / 'adapter', label_names=['dark', 'mid', 'light'], results={'top1': 80.0})
    commits = CommitServer(olah).start()
    try:
        res = subprocess.run(
            [sys.executable, '-m', 'timm_isomix.hub.publish', '--task', str(tmp_path / 'adapter'),
             '--repo-id', 'acme/shades-adapter'],
            env=_env(tmp_path / 'publisher', commits.endpoint, HF_TOKEN='hf_local_test'),
            capture_output=True, text=True, timeout=240)
    finally:
        commits.stop()
    assert res.returncode == 0, res.stderr[-3000:]
    repo = olah.mirrors / 'models' / 'acme' / 'shades-adapter'
    assert sorted(p.name for p in repo.iterdir() if p.name != '.git') == [
        'README.md', 'adapter_config.json', 'adapter_model.safetensors']
    card = (repo / 'README.md').read_text()
    assert model.fingerprint() in card and '80.00 % top-1' in card and "load_task('hf-hub:acme/shades-adapter')" in card
    res = subprocess.run([sys.executable, '-c', ADAPTER_LOADER, str(tmp_path / 'backbone.safetensors'),
                          str(tmp_path / 'out.pt')], env=_env(tmp_path, olah.endpoint), capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / 'out.pt'), model.eval()(x, task='shades'))
    assert report['label_names'] == ['dark', 'mid', 'light']
    assert report['missing'].startswith('WeightsNotPublishedError: acme/no-such-adapter: no task adapter')
    assert 'python -m timm_isomix.hub.publish --task FOLDER --repo-id acme/no-such-adapter' in report['missing']
