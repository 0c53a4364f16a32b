"""The benchmark is a script, not a timed test: these only check that it runs and reports in full."""
import json
import subprocess
import sys

import pytest
import torch

from timm_isomix.tools import benchmark

TINY = ['--suite', 'tiny', '--batch-size', '2', '--img-size', '32', '--reps', '1', '--warmup', '0',
        '--train-steps', '1', '--infer-steps', '1', '--compile', 'none', '--no-memory',
        '--allocator', 'default']  # 'retain' would change malloc for the rest of this pytest process


def test_benchmark_runs_a_tiny_suite_and_writes_every_case_and_target_as_json(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    benchmark.main([*TINY, '--json', str(out)])
    report = json.loads(out.read_text())
    names = [c.name for c in benchmark.make_cases('tiny')]
    assert list(report['cases']) == names
    for name, case in report['cases'].items():
        assert case['train_img_s'] > 0 and case['infer_img_s'] > 0, name
        assert case['train_flops_per_image'] > 0, name
        assert 0 <= case['mix_share'] < 1, name
        assert case['train_system_s_per_step'] >= 0 and case['train_page_fault_mb_per_step'] >= 0, name
    soft = report['cases']['isomix_resnet18 reuse=1 soft']
    assert soft['train_ratio'] == pytest.approx(soft['train_img_s'] / report['cases']['resnet18']['train_img_s'])
    # the references never mix, and reuse=1 runs the reference's FLOPs plus only the mixing
    assert report['cases']['resnet18']['mix_share'] == 0
    assert soft['mix_share'] > 0
    ratio = soft['train_flops_per_image'] / report['cases']['resnet18']['train_flops_per_image']
    assert 1 <= ratio < 1.2
    assert {t['target'].split(' ')[0] for t in report['targets']} == {'inference', 'train'}
    assert len(report['load_before']['loadavg']) == 3
    assert 'resnet18' in capsys.readouterr().out  # the table


def test_modes_time_only_what_is_asked(tmp_path):
    out = tmp_path / 'bench.json'
    benchmark.main([*TINY, '--no-profile', '--modes', 'infer', '--json', str(out)])
    report = json.loads(out.read_text())
    reuse2 = report['cases']['isomix_resnet18 reuse=2 soft']
    assert reuse2['infer_img_s'] > 0 and 'train_img_s' not in reuse2
    assert reuse2['infer_ratio_peer'] > 0 and reuse2['train_ratio_peer'] is None
    train_targets = [t for t in report['targets'] if t['target'].startswith('train')]
    assert train_targets and all(t['met'] is None for t in train_targets)  # reported as n/a, not as missed


def test_memory_probe_reports_the_peak_training_memory_of_one_case(capsys):
    benchmark.main([*TINY, '--memory-probe', 'isomix_resnet18 reuse=1 hard'])
    probe = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert probe['case'] == 'isomix_resnet18 reuse=1 hard' and probe['peak_memory_mb'] >= 0


def test_plain_isometric_reference_has_the_isometric_models_flops_without_a_bank():
    import timm
    iso = timm.create_model('isomix_iso_64_8_p2', order=[0, 1, 2, 3, 0, 1, 2, 3])
    plain = benchmark.plain_isometric(iso)
    count = lambda m: sum(p.numel() for p in m.parameters())
    # eight layers with their own parameters vs four templates (plus hard order: no logits)
    conv = 2 * 64 * 64 * 9 + 4 * 64
    assert count(plain) - count(iso) == 4 * conv


def test_same_depth_resnet_runs_the_blocks_the_schedule_runs_with_the_same_flops():
    import timm
    from torch.utils.flop_counter import FlopCounterMode
    isomix = timm.create_model('isomix_resnet18', reuse=2, num_classes=10)
    resnet = benchmark.same_depth_resnet(isomix)
    assert [len(stage) for stage in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)] == [3, 3, 3, 3]

    def flops(model):
        with FlopCounterMode(display=False) as counter:
            model.eval()(torch.randn(2, 3, 128, 128))
        return counter.get_total_flops()
    # isomix adds only the mixing products (alpha @ templates), a small fraction of the convolutions
    assert flops(resnet) <= flops(isomix) < 1.05 * flops(resnet)


PAGE_FAULTS = '''
import resource, statistics, sys, torch
from timm_isomix.tools.benchmark import retain_freed_memory
retained = retain_freed_memory() if sys.argv[1] == 'retain' else False
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(2 ** 24).fill_(1.)  # 64 MiB, above glibc's largest mmap threshold
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# a retained heap may still grow in the first rounds (an aligned block can miss the freed one), then it is reused
print(retained, min(faults[3:]), statistics.median(faults[3:]))
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt and page-fault counts are Linux-only')
def test_retained_memory_is_reused_without_page_faults_where_the_default_allocator_faults_it_back():
    def run(mode):
        out = subprocess.run([sys.executable, '-c', PAGE_FAULTS, mode], capture_output=True, text=True, check=True)
        retained, least, median = out.stdout.split()
        return retained == 'True', float(least), float(median)
    retained, _, faults = run('retain')
    if not retained:
        pytest.skip('no glibc mallopt on this Linux (e.g. musl): the benchmark times with the default allocator')
    _, default_faults, _ = run('default')
    assert default_faults > 10_000  # 64 MiB in 4 KiB pages, mapped and zeroed anew on every allocation
    assert faults < 1_000


def test_bad_arguments_exit_with_a_message():
    with pytest.raises(SystemExit):
        benchmark.main(['--batch-size', '0'])
    with pytest.raises(SystemExit):
        benchmark.main(['--suite', 'resnet9000'])
