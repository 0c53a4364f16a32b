"""The weights that ship inside the package (timm_isomix/weights/): the published tags trained here load
offline, are the files `publish --local-dir` writes, and reach the top-1 their result files record."""
import json
from pathlib import Path

import pytest
import torch
import timm
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import timm_isomix  # noqa: F401
from timm_isomix import hub
from timm_isomix.models._hub import WEIGHTS_DIR

RESULTS = Path(__file__).resolve().parents[1] / 'experiments' / 'results' / 'weights'
# tag -> the dataset of ../shared/data it was trained on (its val split is what the result file measured)
SHIPPED = {'isomix_iso_64_8_p4.cifar10': 'cifar10', 'isomix_iso_64_8_p4.miniimagenet32': 'miniimagenet32'}


def _recorded(name):
    """validate.py's --results-file of the shipped weights on the full val split."""
    return json.loads((RESULTS / f'{name}.json').read_text())[0]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.delenv(hub.ORG_ENV, raising=False)

    def refuse(repo_id, filename, cache_dir):
        raise AssertionError(f'a shipped tag reached for the Hub ({repo_id}/{filename})')
    monkeypatch.setattr('timm_isomix.models._hub._hub_download', refuse)


def test_every_tag_of_the_default_org_ships_its_weights():
    tags = [n for n in timm.list_pretrained('isomix_*')  # the ResNet tags are timm's weights, warm-started
            if (timm.models.get_pretrained_cfg(n).hf_hub_id or '').startswith(hub.DEFAULT_ORG + '/')]
    assert sorted(tags) == sorted(SHIPPED)
    assert sorted(p.name for p in WEIGHTS_DIR.iterdir()) == sorted(SHIPPED)


@pytest.mark.parametrize('name', SHIPPED)
def test_a_shipped_tag_loads_offline_from_the_package(name):
    folder = WEIGHTS_DIR / name
    # what `python -m timm_isomix.hub.publish CKPT --local-dir` writes, i.e. what it pushes to the Hub
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'mixtures.png', 'model.safetensors']
    model = timm.create_model(name, pretrained=True)
    assert Path(model.pretrained_cfg['file']) == folder / 'model.safetensors'
    weights = load_file(folder / 'model.safetensors')
    assert {k for k in model.state_dict() if not k.endswith('num_batches_tracked')} <= weights.keys() <= model.state_dict().keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == name.split('.')[0]
    assert model.pretrained_cfg['mean'] == tuple(config['pretrained_cfg']['mean'])
    assert model.num_classes == config['num_classes']
    # the model card states the measured top-1
    assert f"{_recorded(name)['top1']:.2f}" in (folder / 'README.md').read_text()


def test_a_user_org_takes_precedence_over_the_shipped_weights(monkeypatch):
    monkeypatch.setenv(hub.ORG_ENV, 'my-lab')
    asked = []
    monkeypatch.setattr('timm_isomix.models._hub._hub_download',
                        lambda repo_id, filename, cache_dir: asked.append(repo_id))
    with pytest.raises(hub.WeightsNotPublishedError, match='my-lab/isomix_iso_64_8_p4.cifar10 are not published'):
        timm.create_model('isomix_iso_64_8_p4.cifar10', pretrained=True)
    assert set(asked) == {'my-lab/isomix_iso_64_8_p4.cifar10'}


@pytest.mark.parametrize('name', SHIPPED)
def test_shipped_weights_reach_their_recorded_top1_on_the_real_val_split(name, shared_dataset, one_thread):
    root = shared_dataset(SHIPPED[name])
    model = timm.create_model(name, pretrained=True).eval()
    data_config = timm.data.resolve_data_config(model=model)
    dataset = timm.data.create_dataset('', root=str(root), split='val',
                                       transform=timm.data.create_transform(**data_config))
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(dataset, batch_size=500):
            correct += (model(x).argmax(-1) == y).sum().item()
    top1 = 100 * correct / len(dataset)
    recorded = _recorded(name)
    assert len(dataset) == 10000
    assert top1 == pytest.approx(recorded['top1'], abs=0.01)
    assert top1 > 100 * 3 / model.num_classes  # far above chance
