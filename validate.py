#!/usr/bin/env python3
"""Validate an isomix (or any timm) model: timm's validate.py flags; prints top-1/top-5, writes JSON or CSV.

    python validate.py --checkpoint output/train/exp/model_best.pth.tar --data-dir /data/imagenette128 --split val
    python validate.py --model 'isomix_*' --pretrained --data-dir /data/imagenet --results-file results.csv

The logic lives in timm_isomix.train.validation; this file only parses arguments and reports errors.
"""
import logging
import sys

from timm.utils import setup_default_logging

from timm_isomix.train.config import ConfigError


def main(argv=None) -> int:
    if not logging.getLogger().handlers:  # called again in one process (tests), keep the first setup
        setup_default_logging()
    from timm_isomix.train.validation import build_validate_parser, validate_many, write_results
    try:
        args = build_validate_parser().parse_args(argv)
        results = validate_many(args)
    except ConfigError as e:
        print(f'validate.py: error: {e}', file=sys.stderr)
        return 2
    for r in results:
        if 'error' in r:
            print(f'{r["model"]} {r["checkpoint"]}: {r["error"]}')
        else:
            print(f'{r["model"]}{" " + r["checkpoint"] if r["checkpoint"] else ""}: '
                  f'top-1 {r["top1"]:.2f}  top-5 {r["top5"]:.2f}  ({r["samples"]} images, {r["img_size"]} px)')
    if args.results_file:
        write_results(results, args.results_file, args.results_format)
        print(f'results written to {args.results_file}')
    return 1 if any('error' in r for r in results) else 0


if __name__ == '__main__':
    sys.exit(main())
