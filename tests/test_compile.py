"""The modern compilation paths: torch.export and torch.compile (TorchScript is not supported, see README)."""
import torch
import timm

import timm_isomix  # noqa: F401


def _model():
    torch.manual_seed(0)
    return timm.create_model('isomix_iso_64_8_p2', temperature=4.0, zero_init_last=False)


def test_torch_export_matches_eager():
    model = _model().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), expected)


def test_torch_compile_inference_matches_eager():
    model = _model().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.compile(model)(x), expected, rtol=1e-4, atol=1e-5)


def test_torch_compile_training_step_matches_eager_gradients():
    """Dynamo + AOT autograd over the mixing and the schedule (inductor's CPU codegen is exercised by
    the inference test and the benchmark; here it would only add minutes of C++ compilation)."""
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for compiled in (False, True):
        model = _model().train()
        run = torch.compile(model, backend='aot_eager') if compiled else model
        run(x).logsumexp(-1).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-5, msg=name)
    assert grads[1]['schedule.mixture.logits'].abs().sum() > 0
