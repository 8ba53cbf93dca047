"""The fused LRN against torch's F.local_response_norm on the paper's constants, per tower half.

Equal means: forward output and input gradient elementwise within 1e-6 of the largest magnitude,
fp32, for every block size the CPU path can take (one block, a few images per block, a block
smaller than one image), both memory formats, odd channel counts and batch 1.
"""

import pytest
import torch
import torch.nn.functional as F

from alexnet_ray.model import AlexNet
from alexnet_ray.model import lrn as lrn_module
from alexnet_ray.model.layers import LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE, GroupedLRN, use_torch_lrn
from alexnet_ray.model.lrn import local_response_norm

PAPER = dict(size=LRN_SIZE, alpha=LRN_ALPHA, beta=LRN_BETA, k=LRN_K)


def torch_lrn(x, groups, size=LRN_SIZE, alpha=LRN_ALPHA, beta=LRN_BETA, k=LRN_K):
    return torch.cat([F.local_response_norm(part, size, alpha, beta, k) for part in x.chunk(groups, dim=1)], dim=1)


def assert_equal_to_largest(actual, expected, what):
    bound = 1e-6 * expected.abs().max().item()
    worst = (actual - expected).abs().max().item()
    assert worst <= bound, f"{what}: max |diff| {worst:.3g} > 1e-6 x largest {expected.abs().max().item():.3g}"


def run_both(x, groups, grad):
    fused_in, torch_in = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fused = GroupedLRN(groups, fused=True)(fused_in)
    expected = torch_lrn(torch_in, groups)
    fused.backward(grad)
    expected.backward(grad)
    return fused, expected, fused_in.grad, torch_in.grad


@pytest.mark.parametrize("block", [1 << 40, 20000, 700, 60])
@pytest.mark.parametrize("shape, groups, scale, channels_last", [
    ((4, 96, 13, 13), 2, 1.0, False),      # random activations, conv1's 96 maps in two towers
    ((4, 96, 13, 13), 2, 1000.0, True),    # large: the denominator is far from k
    ((3, 14, 7, 9), 2, 300.0, False),      # 7 maps per half: odd
    ((2, 7, 6, 5), 1, 100.0, True),        # one group of 7
    ((1, 256, 6, 6), 2, 50.0, True),       # batch 1, conv2's maps
    ((2, 4, 5, 5), 2, 100.0, False),       # halves narrower than the window
])
def test_fused_lrn_equals_torch(monkeypatch, block, shape, groups, scale, channels_last):
    monkeypatch.setattr(lrn_module, "BLOCK_ELEMENTS", block)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * scale
    grad = torch.randn(shape, generator=gen)
    if channels_last:
        x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    fused, expected, fused_grad, expected_grad = run_both(x, groups, grad)
    where = f"{shape} groups={groups} scale={scale} channels_last={channels_last} block={block}"
    assert_equal_to_largest(fused, expected, f"{where} output")
    assert_equal_to_largest(fused_grad, expected_grad, f"{where} input gradient")
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert fused.is_contiguous(memory_format=layout) and fused_grad.is_contiguous(memory_format=layout)
    # the halves really are normalised apart: one LRN over all maps differs at the boundary
    if groups == 2 and shape[1] // 2 >= 2 and scale >= 100:
        assert not torch.allclose(fused, F.local_response_norm(x, LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K))


def test_relu_activations_of_the_model_and_the_model_itself():
    """After a ReLU half the inputs are zero; the whole model with torch's LRN and the fused one."""
    torch.manual_seed(0)
    small = dict(num_classes=10, width=0.25, image_size=64, dropout=0.0)
    fused_model = use_torch_lrn(AlexNet(**small), False)
    torch_model = use_torch_lrn(AlexNet(**small))
    torch_model.load_state_dict(fused_model.state_dict())
    assert [m.fused for m in fused_model.modules() if isinstance(m, GroupedLRN)] == [True]
    assert [m.fused for m in torch_model.modules() if isinstance(m, GroupedLRN)] == [False]
    x = torch.randn(4, 3, 64, 64) * 50
    labels = torch.arange(4)
    for model in (fused_model, torch_model):
        F.cross_entropy(model(x), labels).backward()
    for (name, a), (_, b) in zip(fused_model.named_parameters(), torch_model.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5 * b.grad.abs().max().item(), msg=name)
    relu = torch.relu(torch.randn(2, 96, 27, 27) * 100)
    grad = torch.randn_like(relu)
    fused, expected, fused_grad, expected_grad = run_both(relu, 2, grad)
    assert_equal_to_largest(fused, expected, "ReLU output")
    assert_equal_to_largest(fused_grad, expected_grad, "ReLU input gradient")


@pytest.mark.parametrize("groups, size", [(2, LRN_SIZE), (1, 4), (2, 3)])
def test_gradcheck_float64(groups, size):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 10, 3, 4, generator=gen, dtype=torch.float64) * 30).requires_grad_(True)
    alpha = 5e-2  # larger than the paper's, so the window's cross terms weigh in the gradient
    assert torch.autograd.gradcheck(lambda t: local_response_norm(t, size, alpha, LRN_BETA, LRN_K, groups), (x,))
    # an even window is asymmetric: torch puts size//2 maps before and (size-1)//2 after
    expected = torch_lrn(x.detach(), groups, size=size, alpha=alpha)
    torch.testing.assert_close(local_response_norm(x.detach(), size, alpha, LRN_BETA, LRN_K, groups), expected,
                               rtol=1e-12, atol=1e-12)


def test_low_precision_sums_in_fp32_and_keeps_the_dtype():
    gen = torch.Generator().manual_seed(2)
    x32 = torch.randn(2, 16, 9, 9, generator=gen) * 300
    x = x32.bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = local_response_norm(x, **PAPER, groups=2)
    y.backward(torch.ones_like(y))
    assert y.dtype == x.grad.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=torch.channels_last)
    expected = torch_lrn(x.detach().float(), 2)  # the same bf16 inputs, normalised in fp32
    # only the output's rounding to bf16 (2^-8 relative) separates them
    torch.testing.assert_close(y.float(), expected, rtol=2 ** -8, atol=0)


def test_no_grad_and_argument_checks():
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        y = local_response_norm(x, **PAPER, groups=2)
    assert_equal_to_largest(y, torch_lrn(x, 2), "no-grad output")
    assert local_response_norm(torch.zeros(0, 8, 4, 4), **PAPER).shape == (0, 8, 4, 4)
    with pytest.raises(ValueError, match="7 channels do not split into 2 LRN groups"):
        local_response_norm(torch.zeros(1, 7, 2, 2), **PAPER, groups=2)
    with pytest.raises(ValueError, match="N x C x"):
        local_response_norm(torch.zeros(4, 4), **PAPER)
