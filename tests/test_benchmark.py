"""The benchmark is a script, not a timed test: these only check that it runs and reports in full."""
import json

import pytest

from timm_isomix import benchmark

TINY = ['--suite', 'tiny', '--batch-size', '2', '--img-size', '32', '--reps', '1', '--warmup', '0',
        '--train-steps', '1', '--infer-steps', '1', '--compile', 'none', '--no-memory']


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


def test_bad_arguments_exit_with_a_message():
    with pytest.raises(SystemExit):
        benchmark.main(['--batch-size', '0'])
    with pytest.raises(SystemExit):
        benchmark.main(['--suite', 'resnet9000'])
