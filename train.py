#!/usr/bin/env python3
"""Train an isomix (or any timm) model: timm's train.py flags and YAML configs, isomix-aware.

    python train.py -c hparams/isomix_resnet18_imagenette128.yaml --data-dir /path/to/imagenette128
    torchrun --nproc_per_node=8 train.py -c hparams/isomix_resnet50_in1k.yaml --data-dir /data/imagenet

The logic lives in timm_isomix.train (one model) and timm_isomix.tasks (--tasks: several tasks over one
bank); this file only parses arguments and reports errors.
"""
import logging
import sys

from timm.utils import setup_default_logging

from timm_isomix.train.config import ConfigError, command_line_flags, parse_train_args


def main(argv=None) -> int:
    if not logging.getLogger().handlers:  # called again in one process (tests), keep the first setup
        setup_default_logging()
    try:
        args, args_text = parse_train_args(argv)
        if args.tasks:
            from timm_isomix.tasks.train_tasks import config_from_flags, train_tasks
            try:  # the task file, its datasets and the model it describes
                train_tasks(config_from_flags(args, command_line_flags(argv)))
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f'--tasks {args.tasks}: {str(e).splitlines()[0]}') from None
            return 0
        from timm_isomix.train.run import train
        out = train(args, args_text)
    except ConfigError as e:
        print(f'train.py: error: {e}', file=sys.stderr)
        return 2
    logging.getLogger('train').info(
        f'Done: top-1 {out["results"].get("top1", float("nan")):.2f}, top-5 {out["results"].get("top5", float("nan")):.2f}; '
        f'checkpoints in {out["output_dir"]}; mixture heatmap {out["heatmap"]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
