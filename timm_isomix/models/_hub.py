"""Loading isomix weights from the Hugging Face Hub, a folder or a file: published tags and safety checks.

Three things live here, used by the model factories (`models/*.py`) when `pretrained=True`:

* **Published tags.** `published_cfg()` builds the pretrained cfg of a tag whose weights are published
  with `python -m timm_isomix.hub.publish`; its `hf_hub_id` is `<org>/<model>.<tag>`, the org read from
  `$TIMM_ISOMIX_HUB_ORG` (default `timm-isomix`) when the weights are loaded. When the repository or its
  weight file does not exist, loading raises `WeightsNotPublishedError`, naming the publish command.
  When it exists, its `config.json` supplies the schedule (`model_args`) and the data config. The default
  org's files of the tags trained here ship inside the package (`timm_isomix/weights/`), so those load offline.
* **Safety.** Weights are read as timm reads them: safetensors files, and pickled files (`.bin`, `.pth`,
  ..., e.g. the `pytorch_model.bin` timm's `save_for_hf` writes by default) with
  `torch.load(weights_only=True)`, whose unpickler rebuilds only tensors and plain containers. A pickle
  that needs a full unpickle (any other object, which could run code) is refused: `PickledWeightsError`.
* **Clear errors.** A truncated or corrupted weight file, or weights that do not fit the model
  (another architecture, another schedule), raise `PretrainedWeightsError` naming the file and the problem.

The sources are timm's: `hf-hub:ORG/NAME` and `local-dir:PATH` model names, a tag's `hf_hub_id`,
and `pretrained_cfg_overlay=dict(file=...)`. The weights are checked here, then timm loads them as usual
(`load_pretrained` adapts the classifier and input channels).
"""
import argparse
import json
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open

__all__ = [
    'ORG_ENV', 'DEFAULT_ORG', 'PretrainedWeightsError', 'WeightsNotPublishedError', 'PickledWeightsError',
    'hub_org', 'published_repo_id', 'published_cfg', 'publish_command', 'check_weights_file', 'check_state_dict',
    'pretrained_kwargs', 'torch_load_like_timm', 'shipped_weights', 'apply_config_json', 'WEIGHTS_DIR',
]

ORG_ENV = 'TIMM_ISOMIX_HUB_ORG'
DEFAULT_ORG = 'timm-isomix'
SAFE_WEIGHTS_NAME = 'model.safetensors'
# pickled names timm looks for in a Hub repository or folder, in its order of preference
PICKLED_WEIGHTS_NAMES = ('pytorch_model.bin', 'pytorch_model.pth', 'model.pth')
PICKLED_SUFFIXES = ('.bin', '.pth', '.pt', '.pth.tar', '.ckpt', '.pkl')

# weights of published tags shipped with the package: <model>.<tag>/ as `publish --local-dir` writes it
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / 'weights'
# (model name, tag) -> hf_hub_id as written into the registry at import time
_PUBLISHED: Dict[Tuple[str, str], str] = {}


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights that cannot be used: unreadable, unsafe or not fitting the model."""


class WeightsNotPublishedError(PretrainedWeightsError):
    """The Hub repository (or its weight file) of a pretrained tag does not exist."""


class PickledWeightsError(PretrainedWeightsError):
    """A pickled weight file that only a full unpickle could read (objects other than tensors and containers)."""


# --- published tags -----------------------------------------------------------------------------
def hub_org() -> str:
    """The Hub org holding published isomix weights: `$TIMM_ISOMIX_HUB_ORG`, else `timm-isomix`."""
    return os.environ.get(ORG_ENV) or DEFAULT_ORG


def published_repo_id(model_name: str, tag: str, org: Optional[str] = None) -> str:
    """`<org>/<model_name>.<tag>`, the Hub repository of a published tag."""
    return f'{org or hub_org()}/{model_name}.{tag}'


def publish_command(repo_id: str) -> str:
    return f'python -m timm_isomix.hub.publish CHECKPOINT --repo-id {repo_id}'


def published_cfg(model_name: str, tag: str, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The registry cfg of tag `model_name.tag` whose weights are published by timm_isomix.hub.publish.

    `cfg` is the model's base cfg (input size, normalisation, classes). The org is resolved again when
    the weights are loaded, so setting `$TIMM_ISOMIX_HUB_ORG` after `import timm_isomix` works too.
    """
    repo_id = published_repo_id(model_name, tag)
    _PUBLISHED[(model_name, tag)] = repo_id
    return dict(cfg, hf_hub_id=repo_id, notes=(
        f'published with `{publish_command("<org>/" + model_name + "." + tag)}`; '
        f'the org is ${ORG_ENV} (default {DEFAULT_ORG})',))


# --- files ------------------------------------------------------------------------------------------
def torch_load_like_timm(path: str):
    """`torch.load` as timm reads checkpoints: weights_only=True, whose unpickler rebuilds only tensors and
    plain containers, plus argparse.Namespace (timm's train.py stores its args in that form). A file that
    needs any other object raises pickle.UnpicklingError."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(str(path), map_location='cpu', weights_only=True)


def check_weights_file(path: str) -> List[str]:
    """The keys of the weights in `path`; PretrainedWeightsError naming `path` when it is missing, unsafe,
    truncated or corrupted.

    A safetensors file is opened and its header checked against the file size (this catches truncation
    and damaged headers; damaged tensor bytes inside an intact file cannot be detected without a hash).
    A pickled file is read as timm reads it, with `torch.load(weights_only=True)`; one that needs a full
    unpickle raises PickledWeightsError. The keys of a checkpoint dict are those of its state dict.
    """
    p = Path(path)
    if not p.is_file():
        raise PretrainedWeightsError(f'{path}: no such weight file')
    if p.name.endswith('.safetensors'):
        try:
            with safe_open(str(p), framework='pt') as f:
                keys = list(f.keys())
        except SafetensorError as e:
            raise PretrainedWeightsError(
                f'{path}: not a valid safetensors file, truncated or corrupted ({e})') from e
        if not keys:
            raise PretrainedWeightsError(f'{path}: the safetensors file holds no tensors')
        return keys
    try:
        state = torch_load_like_timm(str(p))
    except pickle.UnpicklingError as e:  # the weights-only unpickler met an object it does not rebuild
        raise PickledWeightsError(
            f'{path}: this pickle holds objects other than tensors and plain containers, and only a full unpickle '
            f'(which can run code) would read it: refused. Save the state dict alone (torch.save(model.state_dict()'
            f', ...)) or as safetensors. ({str(e).splitlines()[0]})') from e
    except Exception as e:  # torch raises several types for a damaged zip or pickle stream
        raise PretrainedWeightsError(f'{path}: cannot read the pickled weights, truncated or corrupted ({e})') from e
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f'{path}: holds a {type(state).__name__}, not a state dict')
    for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):  # the keys timm's loader looks in
        if isinstance(state.get(key), dict):
            return list(state[key])
    return list(state)


def _weights_in_folder(folder: Path) -> str:
    """The weight file of a folder written by timm's save_for_hf (safetensors first)."""
    if not folder.is_dir():
        raise PretrainedWeightsError(f'{folder}: not a folder')
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        return str(folder / SAFE_WEIGHTS_NAME)
    safes = sorted(folder.glob('*.safetensors'))
    if safes:
        return str(safes[0])
    pickled = [folder / n for n in PICKLED_WEIGHTS_NAMES if (folder / n).is_file()]
    pickled += sorted(p for p in folder.iterdir() if p.name.endswith(PICKLED_SUFFIXES) and p not in pickled)
    if pickled:
        return str(pickled[0])
    raise PretrainedWeightsError(f'{folder}: no weight file ({SAFE_WEIGHTS_NAME} or a pickled one) in this folder')


def _hub_download(repo_id: str, filename: str, cache_dir: Optional[str]) -> Optional[str]:
    """Download `filename` of `repo_id` (`ORG/NAME[@revision]`); None when the repo or file does not exist.

    Connection errors and gated repositories propagate: they do not mean "not published".
    """
    from huggingface_hub import errors, hf_hub_download
    # huggingface_hub < 1.0 has no RemoteEntryNotFoundError: a missing file is its base class there, whose other
    # subclass (LocalEntryNotFoundError: offline, not cached) is not "not published"
    missing = getattr(errors, 'RemoteEntryNotFoundError', errors.EntryNotFoundError)
    name, _, revision = repo_id.partition('@')
    try:
        return hf_hub_download(name, filename, revision=revision or None, cache_dir=cache_dir)
    except (errors.GatedRepoError, errors.LocalEntryNotFoundError):
        raise
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, missing):
        return None


def _not_published(repo_id: str, what: str) -> WeightsNotPublishedError:
    from huggingface_hub import constants
    return WeightsNotPublishedError(
        f'the weights of {repo_id} are not published: {what} at {constants.ENDPOINT}. Publish a train.py '
        f'checkpoint with `{publish_command(repo_id.partition("@")[0])}`, or set {ORG_ENV} to the org '
        f'that holds them.')


def _hub_weights(repo_id: str, filename: Optional[str], cache_dir: Optional[str]) -> str:
    """Local path of the weight file of a Hub repository: safetensors first, else a pickled one (timm's order)."""
    names = [filename] if filename else [SAFE_WEIGHTS_NAME, *PICKLED_WEIGHTS_NAMES]
    for filename in names:
        path = _hub_download(repo_id, filename, cache_dir)
        if path is not None:
            return path
    raise _not_published(repo_id, f'no repository or no {" / ".join(names)} in it')


# --- state dicts ------------------------------------------------------------------------------------
def check_state_dict(
        state_dict: Dict[str, torch.Tensor],
        model: torch.nn.Module,
        source: str,
        skip: Tuple[str, ...] = (),
) -> None:
    """Raise PretrainedWeightsError naming `source` when the keys or shapes do not fit `model`.

    `skip` lists key prefixes timm adapts itself (a classifier of another size, the first conv's channels).
    """
    target = model.state_dict()

    def skipped(k):
        return any(k == s or k.startswith(s + '.') for s in skip)

    missing = sorted(k for k in target if k not in state_dict and not skipped(k) and not k.endswith('num_batches_tracked'))
    unexpected = sorted(k for k in state_dict if k not in target and not skipped(k))
    shapes = sorted(
        f'{k} {tuple(state_dict[k].shape)} vs {tuple(target[k].shape)}'
        for k in state_dict if k in target and not skipped(k) and tuple(state_dict[k].shape) != tuple(target[k].shape))
    if not (missing or unexpected or shapes):
        return

    def show(items: List[str]) -> str:
        return ', '.join(items[:6]) + (f', ... ({len(items)} in all)' if len(items) > 6 else '')
    arch = getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
    schedule = model.schedule_args() if hasattr(model, 'schedule_args') else {}
    problems = [f'{name}: [{show(items)}]' for name, items in (
        ('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches (file vs model)', shapes))
        if items]
    raise PretrainedWeightsError(
        f'{source}: the weights do not fit {arch} with schedule {schedule} (weights of another architecture '
        f'or schedule?); ' + '; '.join(problems))


def _checked_filter(source: str, cfg: Dict[str, Any], filter_fn: Optional[Callable]) -> Callable:
    """The model's filter (e.g. ResNet conversion), then the fit check naming the weight file."""
    def fn(state_dict, model):
        if filter_fn is not None:
            try:
                state_dict = filter_fn(state_dict, model)
            except ValueError as e:  # e.g. a ResNet state dict of another depth (resnet.resnet_to_isomix)
                raise PretrainedWeightsError(f'{source}: {e}') from e
        skip = []
        classifier = cfg.get('classifier')
        if classifier and getattr(model, 'num_classes', None) != cfg.get('num_classes'):
            skip.append(classifier)  # timm replaces a classifier of another size
        first_conv = cfg.get('first_conv')
        if first_conv and getattr(model, 'in_chans', 3) != cfg.get('input_size', (3,))[0]:
            skip.append(first_conv)  # timm adapts the input channels
        check_state_dict(state_dict, model, source, skip=tuple(skip))
        return state_dict
    return fn


def _apply_published_config(repo_id: str, cfg: Dict[str, Any], kwargs: Dict[str, Any], cache_dir) -> None:
    """Take the schedule and data config of a published tag from its config.json on the Hub.

    Without a config.json (or offline without it in the cache) the registry cfg and the model's defaults
    apply; weights of another schedule then fail the fit check with a clear error.
    """
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        path = _hub_download(repo_id, 'config.json', cache_dir)
    except LocalEntryNotFoundError:
        path = None
    if path is not None:
        apply_config_json(Path(path), repo_id, cfg, kwargs)


def apply_config_json(path: Path, label: str, cfg: Dict[str, Any], kwargs: Dict[str, Any]) -> None:
    """Take the schedule (`model_args`) and data config of a save_for_hf folder's config.json."""
    try:
        config = json.loads(path.read_text(encoding='utf-8'))
    except ValueError as e:
        raise PretrainedWeightsError(f'{label}/config.json: not valid JSON ({e})') from e
    if config.get('architecture') != cfg.get('architecture'):
        raise PretrainedWeightsError(
            f'{label}/config.json: published for architecture {config.get("architecture")!r}, '
            f'not {cfg.get("architecture")!r}')
    for k, v in (config.get('model_args') or {}).items():
        # the published architecture args (schedule, templates) replace the variant's defaults, which cannot
        # be told apart from explicit ones here; what timm adapts on load (classes, channels, pool) stays the caller's
        if k in ('num_classes', 'in_chans', 'global_pool'):
            kwargs.setdefault(k, v)
        else:
            kwargs[k] = v
    published = config.get('pretrained_cfg') or {}
    for k in ('input_size', 'test_input_size', 'crop_pct', 'test_crop_pct', 'crop_mode', 'interpolation',
              'mean', 'std', 'num_classes', 'label_names', 'label_descriptions', 'pool_size'):
        if k in published:
            cfg[k] = tuple(published[k]) if isinstance(published[k], list) and k != 'label_names' else published[k]


def shipped_weights(model_name: str, tag: str) -> Optional[Path]:
    """The folder of a published tag's weights shipped inside the package, used when the org is the default.

    These are the files `publish` pushes to the default org, so `pretrained=True` works offline; with
    `$TIMM_ISOMIX_HUB_ORG` set, that org's Hub repository is used instead.
    """
    folder = WEIGHTS_DIR / f'{model_name}.{tag}'
    return folder if hub_org() == DEFAULT_ORG and (folder / SAFE_WEIGHTS_NAME).is_file() else None


def pretrained_kwargs(
        variant: str,
        pretrained: bool,
        kwargs: Dict[str, Any],
        filter_fn: Optional[Callable] = None,
        kwargs_fn: Optional[Callable[[Sequence[str], Dict[str, Any]], None]] = None,
) -> Dict[str, Any]:
    """Kwargs for timm's `build_model_with_cfg`, with the pretrained weights located and checked.

    When `pretrained`, the weights timm would load (hf-hub / local-dir / file / tag) are found and checked
    (readable as timm reads them, not truncated), and timm is pointed at that local file. A published tag
    also takes its schedule from its config.json. `kwargs_fn(weight keys, model kwargs)` may then adapt the
    model kwargs to the weights found (a warm start's schedule). The fit of the weights to the built model
    is checked by the returned `pretrained_filter_fn` (after `filter_fn`). Raises PretrainedWeightsError.
    """
    kwargs = dict(kwargs)
    if not pretrained:
        return dict(kwargs, pretrained_filter_fn=filter_fn)
    from timm.models import resolve_pretrained_cfg
    cfg = resolve_pretrained_cfg(
        variant, kwargs.pop('pretrained_cfg', None), kwargs.pop('pretrained_cfg_overlay', None)).to_dict()
    cache_dir = kwargs.get('cache_dir')
    source = cfg.get('source') or ''
    hub_id = cfg.get('hf_hub_id')
    origin = ''  # where a downloaded file came from, for the error messages
    if hub_id and source != 'hf-hub':
        # a published tag: resolve its org now, so that $TIMM_ISOMIX_HUB_ORG set after import counts
        tag = cfg.get('tag') or ''
        if _PUBLISHED.get((variant, tag)) == hub_id:
            hub_id = cfg['hf_hub_id'] = published_repo_id(variant, tag)
            # unless the caller gave weights (pretrained_cfg_overlay): the shipped folder, else the Hub
            if not (cfg.get('file') or cfg.get('state_dict') is not None or cfg.get('url')):
                shipped = shipped_weights(variant, tag)
                if shipped is not None:
                    apply_config_json(shipped / 'config.json', str(shipped), cfg, kwargs)
                    cfg.update(file=str(shipped / SAFE_WEIGHTS_NAME))
                else:
                    # the weights first: their absence is the "not published" error
                    path = _hub_weights(hub_id, cfg.get('hf_hub_filename'), cache_dir)
                    _apply_published_config(hub_id, cfg, kwargs, cache_dir)
                    cfg.update(file=path)
                    origin = f' (from {hub_id})'

    if source == 'hf-hub':
        path = _hub_weights(hub_id, cfg.get('hf_hub_filename'), cache_dir)
        origin = f' (from {hub_id})'
    elif source == 'local-dir':
        path = _weights_in_folder(Path(cfg['file']))
    elif cfg.get('state_dict') is not None:
        path = None  # an in-memory state dict: nothing to read, only the fit to check
    elif cfg.get('file'):
        path = _weights_in_folder(Path(cfg['file'])) if Path(cfg['file']).is_dir() else cfg['file']
    elif hub_id:
        path = _hub_weights(hub_id, cfg.get('hf_hub_filename'), cache_dir)
        origin = f' (from {hub_id})'
    elif cfg.get('url'):
        from timm.models._hub import download_cached_file  # timm's own cached URL download
        path = download_cached_file(cfg['url'], cache_dir=cache_dir)
        origin = f' (from {cfg["url"]})'
    else:
        from timm import list_pretrained
        tags = list_pretrained(f'{variant}.*')
        raise PretrainedWeightsError(
            f'{variant} (tag {cfg.get("tag") or "none"!r}) has no pretrained weights; tags with weights: '
            f'{tags or "none"}. Use a tagged name, hf-hub:ORG/NAME, local-dir:PATH or '
            f'pretrained_cfg_overlay=dict(file=...).')

    if path is not None:
        try:
            keys = check_weights_file(path)
        except PretrainedWeightsError as e:
            raise type(e)(f'{e}{origin}') from e.__cause__
    else:
        keys = list(cfg['state_dict'])
    if kwargs_fn is not None:
        kwargs_fn(keys, kwargs)
    if path is not None:
        # timm loads the checked local file (its 'file' source); hf_hub_id stays in the cfg as provenance
        cfg.update(file=str(path), source='file', url=None, state_dict=None)
    source_name = f'{path}{origin}' if path is not None else 'the in-memory state_dict'
    return dict(kwargs, pretrained_cfg=cfg, pretrained_filter_fn=_checked_filter(source_name, cfg, filter_fn))
