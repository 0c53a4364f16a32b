"""Publish a train.py checkpoint (timm's own `push_to_hf_hub`) or a task adapter to the Hugging Face Hub.

    python -m timm_isomix.hub.publish CHECKPOINT --repo-id ORG/NAME [--use-ema] [--dry-run | --local-dir DIR]
    python -m timm_isomix.hub.publish --task FOLDER --repo-id ORG/NAME [--dry-run | --local-dir DIR]

The checkpoint's 'arch' and 'model_args' rebuild the model (schedule included) with timm.create_model; the
raw or EMA weights are loaded into it and published as timm publishes its own weights: `model.safetensors`
(no pickle), `config.json` ('architecture', 'model_args' with the schedule, 'pretrained_cfg' with the
checkpoint's data config) and a model card (README.md) with the checkpoint's results, dataset, recipe,
parameters and GMACs, plus the mixture heatmap `mixtures.png` found next to the checkpoint.
`--dry-run` / `--local-dir` write the same folder with timm's `save_for_hf` and upload nothing; it loads
with `timm.create_model('local-dir:DIR', pretrained=True)`.
`--task` publishes an adapter folder (`model.save_task`, models/task_adapter.py) as it is, with a model card
(`task_card`: task, classes, accuracy, trainable parameters, the backbone's name and fingerprint); it loads with
`model.load_task('hf-hub:ORG/NAME')` onto the backbone it names.
Token and endpoint: huggingface_hub's usual settings (`HF_TOKEN` or `hf auth login`, `HF_ENDPOINT`).
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from ..models._base import PAPER_ID
from ..models._hub import PretrainedWeightsError, torch_load_like_timm
from ..models.task_adapter import CONFIG_NAME, FINGERPRINT, WEIGHTS_NAME, read_adapter
from ..tools.summary import count_macs

__all__ = ['PublishError', 'load_train_checkpoint', 'rebuild_model', 'count_macs', 'model_card',
           'export_config', 'write_folder', 'publish', 'task_card', 'publish_task', 'main']

HEATMAP_NAME = 'mixtures.png'
PAPER = ('Zhmoginov, Bashkirova, Sandler. Compositional Models: Multi-Task Learning and Knowledge Transfer '
         f'with Modular Networks. 2021. {PAPER_ID}, https://arxiv.org/abs/{PAPER_ID.split(":")[1]}')
CITATION = """@article{zhmoginov2021compositional,
  title={Compositional Models: Multi-Task Learning and Knowledge Transfer with Modular Networks},
  author={Zhmoginov, Andrey and Bashkirova, Dina and Sandler, Mark},
  journal={arXiv preprint arXiv:2107.10963},
  eprint={2107.10963},
  archivePrefix={arXiv},
  year={2021}
}"""
# train.py args worth showing as the recipe, in this order (absent ones are skipped)
RECIPE_KEYS = ('epochs', 'batch_size', 'opt', 'lr', 'weight_decay', 'sched', 'warmup_epochs', 'aa', 'mixup',
               'cutmix', 'smoothing', 'drop_path', 'model_ema', 'model_ema_decay', 'amp')


class PublishError(Exception):
    """A checkpoint or destination that cannot be published; the message says what and why."""


# --- checkpoint -> model -------------------------------------------------------------------------
def load_train_checkpoint(path: str) -> Dict[str, Any]:
    """Read a train.py checkpoint (this project's or timm's; weights only: tensors and plain types), checking the
    keys publishing needs."""
    if not os.path.isfile(path):
        raise PublishError(f'checkpoint not found: {path}')
    try:
        ckpt = torch_load_like_timm(path)
    except Exception as e:  # a damaged zip or pickle stream raises several types
        raise PublishError(f'cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}') from None
    if not isinstance(ckpt, dict):
        raise PublishError(f'{path} is not a train.py checkpoint (a dict), got {type(ckpt).__name__}')
    missing = [k for k in ('arch', 'state_dict') if k not in ckpt]
    if missing:
        raise PublishError(f'{path} is not a train.py checkpoint: missing {missing} (has {sorted(ckpt)})')
    if isinstance(ckpt.get('args'), argparse.Namespace):  # timm's train.py stores its args as a Namespace
        ckpt['args'] = vars(ckpt['args'])
    return ckpt


def rebuild_model(ckpt: Dict[str, Any], use_ema: bool = False, source: str = 'checkpoint') -> nn.Module:
    """timm.create_model(arch, **model_args) with the raw (or EMA) weights loaded strictly; eval mode."""
    import timm
    import timm_isomix  # noqa: F401  (registers the isomix architectures)
    key = 'state_dict_ema' if use_ema else 'state_dict'
    if ckpt.get(key) is None:
        raise PublishError(f'{source} has no {key!r} (EMA weights are saved by train.py --model-ema); '
                           f'publish the raw weights without --use-ema')
    model_args = dict(ckpt.get('model_args') or {})
    try:
        model = timm.create_model(ckpt['arch'], **model_args)
    except Exception as e:
        raise PublishError(f'{source}: cannot rebuild {ckpt["arch"]!r} with model_args {model_args}: {e}') from e
    try:
        model.load_state_dict(ckpt[key], strict=True)
    except RuntimeError as e:
        raise PublishError(f'{source}: {key!r} does not fit {ckpt["arch"]} with model_args {model_args}: {e}') from e
    return model.eval()


# --- what goes into the folder -----------------------------------------------------------------
def _dataset_of(ckpt: Dict[str, Any]) -> Optional[str]:
    args = ckpt.get('args') or {}
    for key in ('dataset', 'data_dir', 'data'):
        value = args.get(key)
        if value:
            return Path(str(value).rstrip('/')).name if key != 'dataset' else str(value)
    return None


def _fmt(value: Any) -> str:
    return f'{value:.2f}' if isinstance(value, float) else str(value)


def export_config(model: nn.Module, ckpt: Dict[str, Any], repo_id: str, use_ema: bool) -> Dict[str, Any]:
    """kwargs for timm's save_for_hf / push_to_hf_hub: model_config, model_args, data_config."""
    model_args = dict(ckpt.get('model_args') or {})
    if hasattr(model, 'schedule_args'):
        for k in ('reuse', 'depth', 'order'):  # the schedule as the model reports it replaces the given one
            model_args.pop(k, None)
        model_args.update(model.schedule_args())
    bank = getattr(model, 'bank', None)
    if bank is not None and hasattr(bank, 'num_templates'):
        model_args['num_templates'] = bank.num_templates  # isometric nets take K as an argument
    name = repo_id.split('/')[-1]
    tag = name.split('.', 1)[1] if '.' in name else None
    pretrained_cfg = dict(
        notes=(f'published with timm_isomix.hub.publish from epoch {ckpt.get("epoch", "?")} of a train.py run '
               f'({"EMA" if use_ema else "raw"} weights)',),
        description=f'isomix {ckpt["arch"]} (template banks with mixtures), trained with timm-isomix',
        paper_ids=PAPER_ID, license='apache-2.0',
    )
    if tag:
        pretrained_cfg['tag'] = tag
    model_config: Dict[str, Any] = dict(pretrained_cfg=pretrained_cfg)
    for key in ('label_names', 'label_descriptions'):
        if ckpt.get(key):
            model_config[key] = ckpt[key]
    data_config = {k: v for k, v in (ckpt.get('data_config') or {}).items()
                   if k in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')}
    for k in ('input_size', 'mean', 'std'):
        if k in data_config:
            data_config[k] = tuple(data_config[k])
    return dict(model_config=model_config, model_args=model_args, data_config=data_config or None)


def model_card(model: nn.Module, ckpt: Dict[str, Any], repo_id: str, use_ema: bool, has_heatmap: bool) -> Dict[str, Any]:
    """The model card dict timm's push_to_hf_hub turns into README.md (results, dataset, recipe, stats)."""
    input_size = tuple((ckpt.get('data_config') or {}).get('input_size') or model.pretrained_cfg['input_size'])
    params = sum(p.numel() for p in model.parameters())
    gmacs = count_macs(model, input_size) / 1e9
    results = ckpt.get('results') or {}
    dataset = _dataset_of(ckpt)
    schedule = model.schedule_args() if hasattr(model, 'schedule_args') else {}
    mixtures = model.mixtures() if hasattr(model, 'mixtures') else {}
    stats = {
        'Params (M)': f'{params / 1e6:.3f}',
        'GMACs': f'{gmacs:.3f}' if gmacs >= 0.001 else f'{gmacs:.2e}',
        'Image size': f'{input_size[-2]} x {input_size[-1]}',
    }
    details: Dict[str, Any] = {
        'Model Type': 'Image classification / feature backbone',
        'Architecture': ckpt['arch'],
        'Schedule': ', '.join(f'{k}={v}' for k, v in schedule.items()) or 'default',
        'Mixtures': {name: f'{m.num_layers} layers x {m.num_templates} templates'
                     + (' (hard order)' if m.is_hard else '') for name, m in mixtures.items()},
        'Model Stats': stats,
    }
    if dataset:
        details['Dataset'] = dataset
    if results:
        details['Results'] = {name: _fmt(results[k]) for k, name in (
            ('top1', 'top-1 (%)'), ('top5', 'top-5 (%)'), ('loss', 'loss')) if k in results}
    args = ckpt.get('args') or {}
    recipe = {k: str(args[k]) for k in RECIPE_KEYS if args.get(k) not in (None, '', False)
              and (k != 'model_ema_decay' or args.get('model_ema'))}  # the decay has a default even without EMA
    details['Recipe'] = dict(recipe, **{'weights': 'EMA' if use_ema else 'raw', 'epoch': ckpt.get('epoch', '?')})
    details['Papers'] = [PAPER]
    description = (
        f'An isomix `{ckpt["arch"]}`: residual blocks of the same shape share a bank of templates and each '
        f'executed layer is a mixture of them. Trained with timm-isomix `train.py`'
        + (f' on {dataset}' if dataset else '') + '.'
        + (f'\n\n![mixture weights per layer and template]({HEATMAP_NAME})\n\n'
           f'Mixture weights (alpha) per executed layer and template.' if has_heatmap else ''))
    usage = (
        '```python\n'
        'import timm\n'
        'import timm_isomix  # registers the isomix architectures with timm\n\n'
        f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()\n"
        'data_config = timm.data.resolve_model_data_config(model)\n'
        'transform = timm.data.create_transform(**data_config, is_training=False)\n'
        '```\n')
    return dict(description=description, details=details, usage=usage, citation=CITATION,
                tags=['image-classification', 'timm', 'timm-isomix'], license='apache-2.0')


def _heatmap_next_to(checkpoint: str) -> Optional[Path]:
    path = Path(checkpoint).resolve().parent / HEATMAP_NAME
    return path if path.is_file() else None


def write_folder(model: nn.Module, folder: str, repo_id: str, config: Dict[str, Any], card: Dict[str, Any],
                 heatmap: Optional[Path]) -> Path:
    """The folder push_to_hf_hub uploads, written with timm's save_for_hf and generate_readme (no upload)."""
    from timm.models import save_for_hf
    from timm.models._hub import generate_readme  # the card push_to_hf_hub writes; not re-exported by timm
    out = Path(folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PublishError(f'{out} exists and is not an empty folder; choose a new --local-dir (nothing is overwritten)')
    save_for_hf(model, str(out), safe_serialization=True, **config)
    (out / 'README.md').write_text(generate_readme(card, repo_id.split('/')[-1]), encoding='utf-8')
    if heatmap is not None:
        shutil.copyfile(heatmap, out / HEATMAP_NAME)
    return out


def _check_repo_id(repo_id: str) -> None:
    if repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise PublishError(f'--repo-id must be ORG/NAME (e.g. my-org/isomix_iso_64_8_p4.cifar10), got {repo_id!r}')


# --- task adapters ------------------------------------------------------------------------------
def _backbone_snippet(backbone: Dict[str, Any]) -> str:
    name, arch = backbone.get('name') or backbone['architecture'], backbone['architecture']
    if name.startswith(('hf-hub:', 'local-dir:')) or (name != arch and name.split('.')[0] == arch):
        return f"backbone = timm.create_model('{name}', pretrained=True, num_classes=0)"
    args = ''.join(f', {k}={v!r}' for k, v in (backbone.get('model_args') or {}).items())
    return (f"backbone = timm.create_model('{arch}', num_classes=0{args})  # then load the backbone's weights "
            f"({name}, fingerprint below)")


def task_card(config: Dict[str, Any], repo_id: str, size: int) -> str:
    """README.md of a task adapter: task, classes, accuracy, trainable parameters, the backbone and its fingerprint."""
    task, backbone, owns = config['task'], config['backbone'], config.get('owns') or {}
    results = config.get('results') or {}
    labels = config.get('label_names')
    accuracy = (f'{results["top1"]:.2f} % top-1' + (f' on {results["dataset"]}' if results.get('dataset') else '')
                if isinstance(results.get('top1'), (int, float)) else 'not recorded')
    lines = [
        '---', 'license: apache-2.0', 'tags:', '- image-classification', '- timm-isomix', '- task-adapter', '---', '',
        f'# {task}: a timm-isomix task adapter', '',
        f'Task `{task}` as an adapter over the `{backbone["architecture"]}` backbone: its mixture logits (which '
        'templates of the backbone\'s banks each layer runs), its BatchNorm statistics'
        + (', its own BatchNorm scale and shift (patch)' if owns.get('patch') else '') + ' and its head. The backbone '
        'itself is not in this repository; the adapter loads onto the backbone whose shared weights have the '
        'fingerprint below, and is refused by any other.', '',
        '## Task', '',
        f'- Task: `{task}`',
        f'- Classes: {config["num_classes"]}' + (f' ({", ".join(map(str, labels))})' if labels else ''),
        f'- Accuracy: {accuracy}' + (f' (mode `{results["mode"]}`)' if results.get('mode') else ''),
        f'- Trainable parameters: {config.get("trainable_parameters")} (mixtures {owns.get("mixtures")}, patch '
        f'{owns.get("patch", 0)}, head {owns.get("head")}); statistics: {owns.get("statistics")} values',
        f'- Adapter: `{WEIGHTS_NAME}`, {size / 1024:.1f} KiB; `{CONFIG_NAME}` (format version '
        f'{config.get("format_version")})', '',
        '## Backbone', '',
        f'- Backbone: `{backbone.get("name") or backbone["architecture"]}` (architecture `{backbone["architecture"]}`, '
        f'model args `{json.dumps(backbone.get("model_args") or {})}`)',
        f'- Fingerprint: `{backbone.get("fingerprint")}`: {FINGERPRINT}', '',
        '## Usage', '', '```python', 'import timm', 'import timm_isomix', '', _backbone_snippet(backbone),
        'model = timm_isomix.MultiTaskIsoMix(backbone, {})',
        f"model.load_task('hf-hub:{repo_id}')",
        f"logits = model.eval()(images, task='{task}')  # images as the data config says (below)",
        f"network = model.bake('{task}')  # the task alone, as plain timm modules", '```', '',
        f'Data config: `{json.dumps(config.get("data_config") or {})}`', '',
        '## Citation', '', PAPER, '', '```bibtex', CITATION, '```', '']
    return '\n'.join(lines)


def publish_task(folder: str, repo_id: str, local_dir: Optional[str] = None, private: bool = False,
                 revision: Optional[str] = None, commit_message: Optional[str] = None) -> str:
    """Publish the adapter in `folder` to `repo_id` with its model card (or write them to `local_dir`); return the
    commit URL or the folder."""
    _check_repo_id(repo_id)
    try:
        config, _, _ = read_adapter(folder)
    except PretrainedWeightsError as e:
        raise PublishError(str(e)) from None
    files = {name: Path(folder) / name for name in (CONFIG_NAME, WEIGHTS_NAME)}
    card = task_card(config, repo_id, files[WEIGHTS_NAME].stat().st_size)
    staging = Path(local_dir) if local_dir is not None else Path(tempfile.mkdtemp(prefix='isomix-task-'))
    if staging.exists() and (not staging.is_dir() or any(staging.iterdir())):
        raise PublishError(f'{staging} exists and is not an empty folder; choose a new --local-dir (nothing is overwritten)')
    staging.mkdir(parents=True, exist_ok=True)
    for name, path in files.items():
        shutil.copyfile(path, staging / name)
    (staging / 'README.md').write_text(card, encoding='utf-8')
    if local_dir is not None:
        return str(staging)
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(staging), revision=revision,
                               commit_message=commit_message or f'Add task adapter {config["task"]!r} '
                                                                f'from timm_isomix.hub.publish')
    shutil.rmtree(staging, ignore_errors=True)
    return str(getattr(commit, 'commit_url', commit))


def publish(
        checkpoint: str,
        repo_id: str,
        use_ema: bool = False,
        local_dir: Optional[str] = None,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: Optional[str] = None,
) -> str:
    """Publish `checkpoint` to `repo_id` (or write the folder to `local_dir`); return the commit URL or folder."""
    _check_repo_id(repo_id)
    ckpt = load_train_checkpoint(checkpoint)
    model = rebuild_model(ckpt, use_ema=use_ema, source=checkpoint)
    heatmap = _heatmap_next_to(checkpoint)
    config = export_config(model, ckpt, repo_id, use_ema)
    card = model_card(model, ckpt, repo_id, use_ema, has_heatmap=heatmap is not None)
    if local_dir is not None:
        return str(write_folder(model, local_dir, repo_id, config, card, heatmap))

    from huggingface_hub import HfApi
    from timm.models import push_to_hf_hub
    message = commit_message or f'Add {ckpt["arch"]} weights (epoch {ckpt.get("epoch", "?")}) from timm_isomix.hub.publish'
    if HfApi().repo_exists(repo_id) and HfApi().file_exists(repo_id, 'README.md', revision=revision):
        print(f'warning: {repo_id} already has a README.md; timm\'s push_to_hf_hub keeps it, so the model card '
              f'(results, recipe) is not updated. Write it with --local-dir and upload it if it should change.',
              file=sys.stderr)
    commit = push_to_hf_hub(model, repo_id, commit_message=message, revision=revision, private=private,
                            model_card=card, safe_serialization=True, **config)
    if heatmap is not None:
        # push_to_hf_hub uploads only weights, config and card: the heatmap the card shows follows in a second commit
        commit = HfApi().upload_file(path_or_fileobj=str(heatmap), path_in_repo=HEATMAP_NAME, repo_id=repo_id,
                                     revision=revision, commit_message=f'{message}: mixture heatmap')
    return str(getattr(commit, 'commit_url', commit))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m timm_isomix.hub.publish', description=__doc__.split('\n\n')[0],
        epilog='Token and endpoint come from huggingface_hub (HF_TOKEN or `hf auth login`; HF_ENDPOINT).')
    parser.add_argument('checkpoint', nargs='?', help='a train.py checkpoint (e.g. output/train/<run>/model_best.pth.tar)')
    parser.add_argument('--task', metavar='FOLDER', help='a task adapter folder (model.save_task) instead of a checkpoint')
    parser.add_argument('--repo-id', required=True, help='Hub repository ORG/NAME, e.g. my-org/isomix_iso_64_8_p4.cifar10')
    parser.add_argument('--use-ema', action='store_true', help="publish the EMA weights ('state_dict_ema')")
    where = parser.add_mutually_exclusive_group()
    where.add_argument('--local-dir', metavar='DIR', help='write the folder that would be uploaded to DIR; no upload')
    where.add_argument('--dry-run', action='store_true', help='as --local-dir into a new temporary folder; no upload')
    parser.add_argument('--private', action='store_true', help='create the repository private')
    parser.add_argument('--revision', default=None, help='branch to commit to (default: main)')
    parser.add_argument('--commit-message', default=None)
    args = parser.parse_args(argv)
    local_dir = args.local_dir
    if args.dry_run:
        local_dir = os.path.join(tempfile.mkdtemp(prefix='isomix-publish-'), args.repo_id.split('/')[-1])
    what = args.task or args.checkpoint
    try:
        if (args.checkpoint is None) == (args.task is None):
            raise PublishError('give a CHECKPOINT or --task FOLDER (an adapter)' + (', not both' if args.task else ''))
        if args.task is not None and args.use_ema:
            raise PublishError('--use-ema applies to a checkpoint; a task adapter has one set of weights')
        if args.task is not None:
            out = publish_task(args.task, args.repo_id, local_dir=local_dir, private=args.private,
                               revision=args.revision, commit_message=args.commit_message)
        else:
            out = publish(args.checkpoint, args.repo_id, use_ema=args.use_ema, local_dir=local_dir,
                          private=args.private, revision=args.revision, commit_message=args.commit_message)
    except PublishError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if local_dir is not None:
        files = ', '.join(sorted(p.name for p in Path(out).iterdir()))
        load = (f"model.load_task('{out}')" if args.task else
                f"timm.create_model('local-dir:{out}', pretrained=True) after `import timm_isomix`")
        print(f'wrote {out} ({files}); nothing uploaded. Load it with {load}')
    else:
        print(f'published {what} to {args.repo_id}: {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
