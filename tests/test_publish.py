"""The publish command: a train.py checkpoint -> the folder timm's push_to_hf_hub uploads (and the upload)."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import timm
from safetensors.torch import load_file

import timm_isomix  # noqa: F401
from timm_isomix.hub import publish

from hubserver import write_train_checkpoint


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    return write_train_checkpoint(tmp_path_factory.mktemp('run'))


@pytest.fixture(scope='module')
def published(checkpoint, tmp_path_factory):
    """The --local-dir folder of the checkpoint's raw weights."""
    out = tmp_path_factory.mktemp('pub') / 'isomix_iso_64_8_p2.cifar10'
    assert publish.main([str(checkpoint), '--repo-id', 'acme/isomix_iso_64_8_p2.cifar10', '--local-dir', str(out)]) == 0
    return out


def _outputs(model, seed=1):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def test_local_dir_holds_safetensors_config_card_and_heatmap_and_no_pickle(published):
    assert sorted(p.name for p in published.iterdir()) == ['README.md', 'config.json', 'mixtures.png', 'model.safetensors']


def test_config_json_carries_architecture_schedule_and_data_config(published, checkpoint):
    config = json.loads((published / 'config.json').read_text())
    ckpt = torch.load(checkpoint, weights_only=True)
    assert config['architecture'] == 'isomix_iso_64_8_p2'
    assert config['model_args']['depth'] == 8 and config['model_args']['num_templates'] == 4
    assert config['model_args']['num_classes'] == config['num_classes'] == 10
    cfg = config['pretrained_cfg']
    assert cfg['mean'] == ckpt['data_config']['mean'] and cfg['std'] == ckpt['data_config']['std']
    assert cfg['input_size'] == [3, 32, 32] and cfg['tag'] == 'cifar10'
    assert 'hf_hub_id' not in cfg and 'file' not in cfg  # timm strips the source of the exported cfg


def test_model_card_reports_results_dataset_recipe_params_gmacs_and_heatmap(published, checkpoint):
    card = (published / 'README.md').read_text()
    model = publish.rebuild_model(torch.load(checkpoint, weights_only=True))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    gmacs = publish.count_macs(model, (3, 32, 32)) / 1e9
    for text in ('library_name: timm', '- cifar10', 'top-1 (%): 55.50', 'top-5 (%): 94.25', 'opt: sgd',
                 'lr: 0.1', 'weight_decay: 2e-05', f'Params (M): {params:.3f}', f'GMACs: {gmacs:.3f}',
                 'Schedule:** depth=8', '](mixtures.png)', "import timm_isomix",
                 "create_model('hf-hub:acme/isomix_iso_64_8_p2.cifar10', pretrained=True)"):
        assert text in card, text


def test_the_paper_is_arxiv_2107_10963_in_the_card_its_citation_and_the_pretrained_cfg(published):
    card = (published / 'README.md').read_text()
    assert 'arXiv:2107.10963' in card and 'https://arxiv.org/abs/2107.10963' in card
    assert 'journal={arXiv preprint arXiv:2107.10963}' in card and 'eprint={2107.10963}' in card
    assert 'author={Zhmoginov, Andrey and Bashkirova, Dina and Sandler, Mark}' in card
    assert json.loads((published / 'config.json').read_text())['pretrained_cfg']['paper_ids'] == 'arXiv:2107.10963'
    assert timm.create_model(f'local-dir:{published}', pretrained=True).pretrained_cfg['paper_ids'] == 'arXiv:2107.10963'
    assert '2106.02626' not in card  # the paper cited here before, a different one


def test_count_macs_is_half_the_flops_of_a_conv_counted_by_hand():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False))
    assert publish.count_macs(conv, (3, 16, 16)) == 8 * 3 * 9 * 16 * 16


def test_published_folder_loads_the_same_weights_and_outputs_via_local_dir_and_file(published, checkpoint):
    ckpt = torch.load(checkpoint, weights_only=True)
    reference = publish.rebuild_model(ckpt)
    for model in (timm.create_model(f'local-dir:{published}', pretrained=True),
                  timm.create_model('isomix_iso_64_8_p2', pretrained=True,
                                    pretrained_cfg_overlay=dict(file=str(published / 'model.safetensors')))):
        assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt['state_dict'].items())
        assert torch.equal(_outputs(model), _outputs(reference))


def test_use_ema_publishes_the_ema_weights_and_raw_is_the_default(published, checkpoint, tmp_path):
    ckpt = torch.load(checkpoint, weights_only=True)
    assert publish.main([str(checkpoint), '--repo-id', 'acme/x', '--use-ema', '--local-dir', str(tmp_path / 'ema')]) == 0
    ema = load_file(tmp_path / 'ema' / 'model.safetensors')
    raw = load_file(published / 'model.safetensors')
    assert all(torch.equal(ema[k], v) for k, v in ckpt['state_dict_ema'].items())
    assert all(torch.equal(raw[k], v) for k, v in ckpt['state_dict'].items())
    assert 'weights: EMA' in (tmp_path / 'ema' / 'README.md').read_text()


def test_hard_order_schedule_round_trips_through_config_json(tmp_path):
    ckpt_path = write_train_checkpoint(tmp_path / 'run', order=[3, 3, 0, 1, 2], heatmap=False, ema=False)
    out = tmp_path / 'pub'
    assert publish.main([str(ckpt_path), '--repo-id', 'acme/ordered', '--local-dir', str(out)]) == 0
    assert json.loads((out / 'config.json').read_text())['model_args']['order'] == [3, 3, 0, 1, 2]
    assert 'mixtures.png' not in {p.name for p in out.iterdir()}
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert model.schedule_args() == {'order': [3, 3, 0, 1, 2]}
    assert torch.equal(_outputs(model), _outputs(publish.rebuild_model(torch.load(ckpt_path, weights_only=True))))


def test_use_ema_without_ema_weights_fails_and_says_so(tmp_path, capsys):
    ckpt_path = write_train_checkpoint(tmp_path, ema=False, heatmap=False)
    assert publish.main([str(ckpt_path), '--repo-id', 'acme/x', '--use-ema', '--dry-run']) == 2
    assert "no 'state_dict_ema'" in capsys.readouterr().err


@pytest.mark.parametrize('content, message', [
    ({'state_dict': {}}, "missing ['arch']"),
    (b'not a checkpoint', 'cannot read checkpoint'),
])
def test_a_file_that_is_not_a_train_checkpoint_is_refused_naming_it(tmp_path, capsys, content, message):
    path = tmp_path / 'bad.pth.tar'
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    assert publish.main([str(path), '--repo-id', 'acme/x', '--dry-run']) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err


def test_a_non_empty_local_dir_is_never_overwritten(checkpoint, tmp_path, capsys):
    (tmp_path / 'keep.txt').write_text('mine')
    assert publish.main([str(checkpoint), '--repo-id', 'acme/x', '--local-dir', str(tmp_path)]) == 2
    assert 'not an empty folder' in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['keep.txt']


def test_repo_id_must_be_org_slash_name(checkpoint, capsys):
    assert publish.main([str(checkpoint), '--repo-id', 'no-org', '--dry-run']) == 2
    assert 'ORG/NAME' in capsys.readouterr().err


def test_upload_goes_through_timms_push_to_hf_hub_safetensors_only_then_the_heatmap(checkpoint, monkeypatch):
    """The Hub transport (create_repo, file_exists, upload_folder/upload_file) is recorded instead of sent;
    everything before it (timm's push_to_hf_hub: save_for_hf, model card) runs for real."""
    import huggingface_hub
    calls = []

    def upload_folder(self, repo_id, folder_path, **kw):
        calls.append(('folder', repo_id, sorted(p.name for p in Path(folder_path).iterdir()), kw.get('revision')))
        return SimpleNamespace(commit_url='http://hub/commit/1')

    def upload_file(self, path_or_fileobj, path_in_repo, repo_id, **kw):
        calls.append(('file', repo_id, [path_in_repo], kw.get('revision')))
        return SimpleNamespace(commit_url='http://hub/commit/2')

    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo', lambda self, repo_id, **kw: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(huggingface_hub.HfApi, 'repo_exists', lambda self, repo_id, **kw: False)
    monkeypatch.setattr(huggingface_hub.HfApi, 'file_exists', lambda self, repo_id, filename, **kw: False)
    monkeypatch.setattr(huggingface_hub.HfApi, 'upload_folder', upload_folder)
    monkeypatch.setattr(huggingface_hub.HfApi, 'upload_file', upload_file)
    assert publish.publish(str(checkpoint), 'acme/isomix_iso_64_8_p2.cifar10', revision='dev') == 'http://hub/commit/2'
    assert calls == [
        ('folder', 'acme/isomix_iso_64_8_p2.cifar10', ['README.md', 'config.json', 'model.safetensors'], 'dev'),
        ('file', 'acme/isomix_iso_64_8_p2.cifar10', ['mixtures.png'], 'dev'),
    ]


# --- task adapters ---------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def adapter(tmp_path_factory):
    """An adapter folder (model.save_task) of a patched task over a tiny isometric backbone, and its model."""
    torch.manual_seed(0)
    backbone = timm.create_model('isomix_iso_64_8_p2', num_classes=0, width=8, depth=4, num_templates=2, patch_size=4)
    model = timm_isomix.MultiTaskIsoMix(backbone, {})
    model.add_task('shades', 3, patch=True)
    folder = tmp_path_factory.mktemp('adapter') / 'shades'
    model.save_task('shades', folder, label_names=['dark', 'mid', 'light'],
                    results={'top1': 77.5, 'mode': 'mixture_patch', 'dataset': 'shades'})
    return folder, model


def test_a_task_adapter_publishes_as_it_is_with_a_card_naming_task_classes_accuracy_parameters_backbone(adapter, tmp_path):
    folder, model = adapter
    out = tmp_path / 'pub'
    assert publish.main(['--task', str(folder), '--repo-id', 'acme/shades', '--local-dir', str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'adapter_config.json', 'adapter_model.safetensors']
    assert (out / 'adapter_model.safetensors').read_bytes() == (folder / 'adapter_model.safetensors').read_bytes()
    card = (out / 'README.md').read_text()
    trainable = json.loads((folder / 'adapter_config.json').read_text())['trainable_parameters']
    for text in ('Task: `shades`', 'Classes: 3 (dark, mid, light)', '77.50 % top-1 on shades (mode `mixture_patch`)',
                 f'Trainable parameters: {trainable}', 'architecture `isomix_iso_64_8_p2`', model.fingerprint(),
                 "model.load_task('hf-hub:acme/shades')", 'arXiv:2107.10963'):
        assert text in card, text
    again = timm_isomix.MultiTaskIsoMix(copy_of_backbone(model), {})
    again.load_task(str(out))  # the published folder is an adapter folder
    assert torch.equal(again.tasks['shades'].patch_layers, model.tasks['shades'].patch_layers)


def copy_of_backbone(model):
    """A fresh isometric backbone holding `model`'s shared weights."""
    b = timm.create_model('isomix_iso_64_8_p2', num_classes=0, width=8, depth=4, num_templates=2, patch_size=4)
    b.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(('stem.', 'bank.'))}, strict=False)
    return b


@pytest.mark.parametrize('args, message', [
    (['--repo-id', 'acme/x', '--dry-run'], 'give a CHECKPOINT or --task FOLDER'),
    (['ckpt.pth', '--task', 'FOLDER', '--repo-id', 'acme/x', '--dry-run'], 'not both'),
    (['--task', 'FOLDER', '--use-ema', '--repo-id', 'acme/x', '--dry-run'], '--use-ema applies to a checkpoint'),
    (['--task', 'no/such/folder', '--repo-id', 'acme/x', '--dry-run'], 'not a task adapter folder'),
    (['--task', 'FOLDER', '--repo-id', 'no-org', '--dry-run'], 'ORG/NAME'),
])
def test_bad_task_publishing_input_is_one_line_and_exit_2(adapter, capsys, args, message):
    args = [str(adapter[0]) if a == 'FOLDER' else a for a in args]
    assert publish.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
