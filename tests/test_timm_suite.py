"""timm's own model tests (tests/test_models.py of the pinned timm release), run on every isomix model and tag.

timm's file parametrizes its tests over timm's registry at import time, and its forward_intermediates
tests only over timm's own modules, so this file loads it as a library and calls each per-model test
function for the isomix models. The file is taken from the timm source release on the package registry
(`pip download timm==VERSION --no-binary :all:`), cached, never committed. `$TIMM_SRC` may point at an
unpacked timm source tree instead. When the release cannot be fetched the tests skip, except under CI
(`CI` set to true), where that fails the run.

Every function of timm's file that takes a model name and applies to a CNN classifier runs on every isomix
model. Not run, and why: the TorchScript tests (`test_model_forward_torchscript` is pinned to fail with
TorchScript's own error, see below; `test_pruned_features_torchscript` and
`test_feature_getter_stage_ends_torchscript` script the same models); `test_model_default_cfgs_non_std`
(for transformer / hybrid models; the isomix models pass the standard `test_model_default_cfgs`);
`test_catavgmax_unsupported` (for models that cannot take concat pooling; isomix heads take it, see
`test_head_hidden_size`); `test_model_inference` (timm's stored outputs of its own `test_*` models); and the
tests written for one timm family (Swin windows, ViT encoders, relative position tables, NaFlex, ...).
`test_resnetv2_stem_feature_odd_size` runs on the staged models, whose stem is timm's ResNet stem; the
isometric stem (a conv with kernel = stride = patch) floors odd sizes instead of rounding them up.

Pretrained tags hold timm's ResNet weights (warm start) or weights published by timm_isomix.hub.publish.
With no network, the Hugging Face cache is filled with stand-in weights of the same architecture (random,
saved as timm publishes them: model.safetensors, and config.json for isomix repositories) and the hub is
set offline: the whole loading path (hub cache, conversion filter,
classifier and in_chans adaptation) runs, only the numbers in the weights are not the published ones.
"""
import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import timm

import timm_isomix  # noqa: F401  (registers the models)

MODELS = timm.list_models('isomix_*')
STAGED = timm.list_models('isomix_resnet*')
TAGS = timm.list_models('isomix_*', pretrained=True)
TAGGED = [t for t in timm.list_models('isomix_*', include_tags=True) if '.' in t]


def _timm_tests_dir() -> Path:
    if os.environ.get('TIMM_SRC'):
        return Path(os.environ['TIMM_SRC']) / 'tests'
    cache = Path(os.environ.get('ISOMIX_CACHE') or Path.home() / '.cache' / 'timm-isomix') / f'timm-src-{timm.__version__}'
    tests = cache / f'timm-{timm.__version__}' / 'tests'
    if not (tests / 'test_models.py').is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:', '-d', str(cache),
               f'timm=={timm.__version__}']
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        archives = list(cache.glob(f'timm-{timm.__version__}.tar.gz'))
        if res.returncode != 0 or not archives:
            why = f'cannot fetch timm {timm.__version__} source release for its tests: {res.stderr.strip()[-300:]}'
            if os.environ.get('CI', '').lower() in ('1', 'true', 'yes'):
                pytest.fail(f'{why} (CI is set: the timm suite must run)')
            pytest.skip(why)
        with tarfile.open(archives[0]) as tar:
            tar.extractall(cache, filter='data')
    return tests


@pytest.fixture(scope='module')
def timm_tests():
    """timm's tests/test_models.py, imported as a module (not collected by pytest)."""
    path = _timm_tests_dir() / 'test_models.py'
    spec = importlib.util.spec_from_file_location('timm_release_test_models', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def stand_in_hub(tmp_path_factory):
    """An offline Hugging Face cache holding, for every tag, weights shaped like the ones timm publishes."""
    import huggingface_hub.constants as hf_constants
    from safetensors.torch import save_file
    from timm.models import get_pretrained_cfg

    cache = tmp_path_factory.mktemp('hf-cache')
    for tag in TAGS:
        repo_id = get_pretrained_cfg(tag).hf_hub_id
        source = repo_id.split('/', 1)[1].split('.')[0]  # timm/resnet50.a1_in1k -> resnet50
        snapshot = cache / f"models--{repo_id.replace('/', '--')}" / 'snapshots' / ('0' * 40)
        if snapshot.exists():
            continue
        snapshot.mkdir(parents=True)
        (snapshot.parent.parent / 'refs').mkdir()
        (snapshot.parent.parent / 'refs' / 'main').write_text('0' * 40)
        torch.manual_seed(0)
        if source.startswith('isomix_'):  # a tag for weights published by timm_isomix.hub.publish
            timm.models.save_for_hf(timm.create_model(source), str(snapshot), safe_serialization=True)
        else:  # timm's ResNet weights, converted on load
            save_file(timm.create_model(source).state_dict(), str(snapshot / 'model.safetensors'))
    patch = pytest.MonkeyPatch()
    patch.setattr(hf_constants, 'HF_HUB_CACHE', str(cache))
    patch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    yield cache
    patch.undo()


@pytest.mark.parametrize('model_name', MODELS)
def test_timm_model_forward(timm_tests, model_name):
    timm_tests.test_model_forward(model_name, 1)


@pytest.mark.parametrize('model_name', MODELS)
def test_timm_model_backward(timm_tests, model_name):
    timm_tests.test_model_backward(model_name, 2)


@pytest.mark.parametrize('model_name', MODELS + TAGGED)
def test_timm_model_default_cfgs(timm_tests, model_name):
    timm_tests.test_model_default_cfgs(model_name, 1, 'meta')


@pytest.mark.parametrize('model_name', MODELS)
def test_timm_model_forward_features(timm_tests, model_name):
    timm_tests.test_model_forward_features(model_name, 1)


@pytest.mark.parametrize('model_name', MODELS)
def test_timm_model_forward_intermediates_features(timm_tests, model_name):
    timm_tests.test_model_forward_intermediates_features(model_name, 1)


@pytest.mark.parametrize('model_name', MODELS)
def test_timm_model_forward_intermediates(timm_tests, model_name):
    timm_tests.test_model_forward_intermediates(model_name, 1)


@pytest.mark.parametrize('model_name', MODELS)
def test_timm_prune_intermediate_layers_contract(timm_tests, model_name):
    timm_tests.test_prune_intermediate_layers_contract(model_name)


@pytest.mark.parametrize('model_name', MODELS)
def test_timm_prune_intermediate_layers_params_used(timm_tests, model_name):
    timm_tests.test_prune_intermediate_layers_params_used(model_name)


@pytest.mark.parametrize('model_name', MODELS)
def test_timm_head_hidden_size(timm_tests, model_name):
    timm_tests.test_head_hidden_size(model_name, {})


@pytest.mark.parametrize('model_name', MODELS)
def test_timm_model_forward_fx(timm_tests, model_name):
    timm_tests.test_model_forward_fx(model_name, 1)


@pytest.mark.parametrize('model_name', MODELS)
def test_timm_model_backward_fx(timm_tests, model_name):
    timm_tests.test_model_backward_fx(model_name, 2)


@pytest.mark.parametrize('model_name', TAGS)
def test_timm_model_load_pretrained(timm_tests, stand_in_hub, model_name):
    timm_tests.test_model_load_pretrained(model_name, 1)


@pytest.mark.parametrize('model_name', TAGS)
def test_timm_model_features_pretrained(timm_tests, stand_in_hub, model_name):
    timm_tests.test_model_features_pretrained(model_name, 1)


@pytest.mark.parametrize('model_name', MODELS)
def test_timm_model_init_weights_after_to_empty(timm_tests, model_name):
    timm_tests.test_model_init_weights_after_to_empty(model_name, {})


@pytest.mark.parametrize('model_name', MODELS)
def test_timm_headless_checkpoint_reload(timm_tests, model_name):
    timm_tests.test_headless_checkpoint_reload(model_name, {})


@pytest.mark.parametrize('model_name', MODELS)
def test_timm_reset_classifier_keeps_pool(timm_tests, model_name):
    timm_tests.test_reset_classifier_keeps_pool(model_name)


@pytest.mark.parametrize('model_name', MODELS)
def test_timm_features_only_grad_checkpointing_backward(timm_tests, model_name):
    timm_tests.test_features_only_grad_checkpointing_backward(model_name)


@pytest.mark.parametrize('model_name', MODELS)
def test_timm_features_only_feature_cls_class(timm_tests, model_name):
    timm_tests.test_features_only_feature_cls_class(model_name)


@pytest.mark.slow  # prunes a copy at every feature index (16 for the deepest isometric models); CI runs it
@pytest.mark.parametrize('model_name', MODELS)
def test_timm_forward_after_prune_intermediate_layers(timm_tests, model_name):
    timm_tests.test_forward_after_prune_intermediate_layers(model_name)


@pytest.mark.parametrize('model_name', MODELS)
def test_timm_prune_intermediate_layers_last_feature(timm_tests, model_name):
    timm_tests.test_prune_intermediate_layers_last_feature(model_name, True)  # no final conv or norm


@pytest.mark.parametrize('model_name', MODELS)
def test_timm_prune_to_stem_feature(timm_tests, model_name):
    timm_tests.test_prune_to_stem_feature(model_name)


@pytest.mark.parametrize('model_name', MODELS)
def test_timm_forward_intermediates_stop_early_final_norm(timm_tests, model_name):
    timm_tests.test_forward_intermediates_stop_early_final_norm(model_name, {})


@pytest.mark.parametrize('model_name', STAGED)
def test_timm_stem_feature_odd_size(timm_tests, model_name):
    timm_tests.test_resnetv2_stem_feature_odd_size(model_name, {})


@pytest.mark.parametrize('model_name', MODELS)
def test_timm_torchscript_is_not_supported_and_says_why(timm_tests, model_name):
    """TorchScript cannot compile the schedule (a layer's parameters are a dict of views built per call from
    the bank); torch.compile and torch.export are the supported paths (test_compile.py). This pins down that
    scripting fails loudly, in TorchScript's compiler, rather than producing a wrong model or failing elsewhere."""
    with pytest.raises(RuntimeError) as failure:
        timm_tests.test_model_forward_torchscript(model_name, 1)
    message = str(failure.value)  # TorchScript's compiler stops in the mixture (bank.py), the same for every model
    assert 'timm_isomix/bank.py' in message or 'timm_isomix.bank.Mixture' in message, message
