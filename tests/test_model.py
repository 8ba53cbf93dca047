"""Reference AlexNet and Tower: sizes, constants, init, argument checks, split/merge."""

import pytest
import torch
from torch import nn

from alexnet_ray.model import AlexNet, ModelConfig, Tower, merge_state_dicts, split_state_dict

SMALL = dict(num_classes=10, width=0.25, image_size=64, dropout=0.0)


def test_parameter_count_is_the_papers():
    model = AlexNet()
    assert sum(p.numel() for p in model.parameters()) == 60_965_224
    # Without groups conv2/4/5 would read both halves: twice the input channels of their weights.
    grouped_weights = sum(getattr(model, n).weight.numel() for n in ("conv2", "conv4", "conv5"))
    assert 60_965_224 + grouped_weights == 62_378_344
    names = [n for n, _ in model.named_parameters()]
    assert names == [f"{layer}.{kind}" for layer in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
                     for kind in ("weight", "bias")]


def test_layer_output_shapes_at_224():
    model = AlexNet().eval()
    seen = {}
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, tuple(o.shape)))
    pools = []
    model.pool.register_forward_hook(lambda m, i, o: pools.append(tuple(o.shape[1:])))
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 1000)
    assert seen["conv1"] == (1, 96, 55, 55)
    assert seen["conv2"] == (1, 256, 27, 27)
    assert seen["conv3"] == (1, 384, 13, 13)
    assert seen["conv4"] == (1, 384, 13, 13)
    assert seen["conv5"] == (1, 256, 13, 13)
    assert pools == [(96, 27, 27), (256, 13, 13), (256, 6, 6)]
    assert model.fc6.in_features == 9216 and seen["fc6"] == (1, 4096) and seen["fc7"] == (1, 4096)


def test_lrn_uses_paper_constants_within_each_half():
    model = AlexNet(**SMALL)
    lrn = model.lrn.lrn
    assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 5e-4, 0.75, 2.0)
    a = torch.rand(1, 8, 2, 2) * 10
    out = model.lrn(a)
    # Paper §3.3: b_i = a_i / (2 + 1e-4 * sum_{|j-i|<=2, same half} a_j^2)^0.75
    expected = torch.empty_like(a)
    for i in range(8):
        lo, hi = (0, 4) if i < 4 else (4, 8)
        window = a[:, max(lo, i - 2):min(hi, i + 3)]
        expected[:, i] = a[:, i] / (2 + 1e-4 * (window**2).sum(1)) ** 0.75
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)


def test_paper_and_caffe_init():
    torch.manual_seed(0)
    paper = AlexNet(width=0.5, image_size=64, num_classes=100)
    for name in ("conv1", "conv3", "fc8"):
        assert torch.all(getattr(paper, name).bias == 0)
    for name in ("conv2", "conv4", "conv5", "fc6", "fc7"):
        assert torch.all(getattr(paper, name).bias == 1)
    assert abs(paper.fc6.weight.std().item() - 0.01) < 5e-4
    assert abs(paper.fc6.weight.mean().item()) < 5e-4
    caffe = AlexNet(width=0.5, image_size=64, num_classes=100, init="caffe")
    assert torch.all(caffe.conv2.bias == 0.1) and torch.all(caffe.conv1.bias == 0)
    assert abs(caffe.fc7.weight.std().item() - 0.005) < 3e-4
    assert abs(caffe.conv3.weight.std().item() - 0.01) < 5e-4


@pytest.mark.parametrize("kwargs, message", [
    (dict(width=0.01), "model.width=0.01: leaves conv1 with 0 channels"),
    (dict(width=0.3), "leaves conv3 with 115 channels, odd"),
    (dict(width=-1), "model.width=-1"),
    (dict(image_size=62), "model.image_size=62: too small"),
    (dict(image_size=64, pool="plain"), None),
    (dict(activation="gelu"), "model.activation='gelu'"),
    (dict(pool="avg"), "model.pool='avg'"),
    (dict(init="xavier"), "model.init='xavier'"),
    (dict(dropout=1.0), "model.dropout=1.0"),
    (dict(num_classes=0), "model.num_classes=0"),
    (dict(num_classes=7, towers=2), "model.num_classes=7: does not split evenly over 2 towers"),
    (dict(towers=3), "parallel.towers=3: must be 1 or 2"),
])
def test_model_config_plan_checks_every_field(kwargs, message):
    towers = kwargs.pop("towers", 1)
    if message is None:
        ModelConfig(**kwargs).plan(towers)
        return
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        ModelConfig(**kwargs).plan(towers)


def test_bad_args_fail_at_construction():
    with pytest.raises(ValueError, match="model.width"):
        AlexNet(width=0.01)
    with pytest.raises(ValueError, match="tower=2"):
        Tower(2, 2, **SMALL)


def test_image_64_and_ablations_run():
    x = torch.randn(2, 3, 64, 64)
    for kwargs in ({}, dict(activation="tanh"), dict(lrn=False), dict(pool="plain")):
        model = AlexNet(**SMALL, **kwargs)
        assert model(x).shape == (2, 10)
    assert isinstance(AlexNet(**SMALL, activation="tanh").act, nn.Tanh)
    assert isinstance(AlexNet(**SMALL, lrn=False).lrn, nn.Identity)
    assert AlexNet(**SMALL, pool="plain").pool.kernel_size == 2


def test_split_merge_round_trip_is_exact():
    model = AlexNet(**SMALL)
    sd = model.state_dict()
    for towers in (1, 2):
        parts = split_state_dict(sd, towers)
        assert len(parts) == towers
        merged = merge_state_dicts(parts)
        assert list(merged) == list(sd)
        for name in sd:
            assert torch.equal(merged[name], sd[name])
    halves = split_state_dict(sd, 2)
    towers = [Tower(t, 2, **SMALL) for t in range(2)]
    for tower, half in zip(towers, halves):
        tower.load_state_dict(half)  # strict: names and shapes match the reference's
    assert towers[0].conv2.weight.shape == (32, 12, 5, 5) and towers[0].conv3.weight.shape == (48, 64, 3, 3)
    # conv2 is grouped in the reference: tower 1's half is exactly group 1.
    assert torch.equal(towers[1].conv2.weight, sd["conv2.weight"][32:])
    # momentum-like dicts with 0-d entries
    extra = {"fc8.weight": torch.arange(20.0).reshape(10, 2), "step": torch.tensor(3.0)}
    assert torch.equal(merge_state_dicts(split_state_dict(extra, 2))["fc8.weight"], extra["fc8.weight"])
    with pytest.raises(ValueError, match="towers=3"):
        split_state_dict(sd, 3)


@pytest.mark.parametrize("ablation", [{}, dict(activation="tanh", lrn=False, pool="plain")])
def test_tower_of_one_is_the_reference_and_two_needs_an_exchange(ablation):
    model = AlexNet(**SMALL, **ablation)
    whole = Tower.from_reference(model, 0, 1)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(whole(x), model(x), rtol=0, atol=0)
    half = Tower.from_reference(model, 0, 2)
    with pytest.raises(ValueError, match="needs an exchange"):
        half(x)
    # Two towers with a local stand-in for the exchange (concatenate both towers' halves) equal the reference.
    towers = [Tower.from_reference(model, t, 2) for t in range(2)]
    h = [x, x]
    for stage in range(5):
        outs = [tw.stage(stage, inp) for tw, inp in zip(towers, h)]
        full = torch.cat(outs, dim=1)
        h = [full, full]
    torch.testing.assert_close(h[0], model(x), rtol=1e-5, atol=1e-6)


# ---- dropout keyed by the step: the same masks in every layout ---------------------------------

def test_dropout_masks_are_slices_of_one_global_mask():
    from alexnet_ray.model.dropout import StepDropout

    full = StepDropout(0.5, 6, 0, 64)
    halves = [StepDropout(0.5, 6, 32 * t, 64) for t in range(2)]
    ones = torch.ones(13, 64)
    for module in (full, *halves):
        module.set_key(seed=3, epoch=1, step=4, row_offset=0)
    whole = full(ones)
    assert torch.equal(torch.cat([h(ones[:, :32]) for h in halves], dim=1), whole)
    # rows 5.. of the global batch, computed alone (another replica or micro-batch)
    for h in halves:
        h.set_key(seed=3, epoch=1, step=4, row_offset=5)
    assert torch.equal(halves[1](ones[5:, :32]), whole[5:, 32:])
    assert set(whole.unique().tolist()) == {0.0, 2.0}  # kept units scaled by 1 / (1 - p)


def test_dropout_masks_are_fair_and_untied():
    from alexnet_ray.model.dropout import StepDropout

    module = StepDropout(0.5, 7, 0, 4096)
    module.set_key(seed=0, epoch=0, step=0)
    kept = module(torch.ones(256, 4096)) > 0
    assert abs(kept.float().mean().item() - 0.5) < 0.005  # 1M draws: 5 standard deviations is 0.0025
    both = (kept[:, :2048] & kept[:, 2048:]).float().mean().item()
    assert abs(both - 0.25) < 0.005  # the towers' halves drop independently, not the same pattern
    assert abs((kept[:128] & kept[128:]).float().mean().item() - 0.25) < 0.005  # so do rows (replicas)
    masks = []
    for key in [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0)]:
        module.set_key(*key)
        masks.append(module(torch.ones(8, 4096)) > 0)
    assert all(not torch.equal(masks[0], m) for m in masks[1:])  # each step, epoch, seed: new masks
    assert not torch.equal(StepDropout(0.5, 6, 0, 4096).train()(torch.ones(8, 4096)),
                           StepDropout(0.5, 6, 0, 4096).train()(torch.ones(8, 4096)))  # unkeyed: fresh


def test_model_dropout_follows_the_step_key():
    from alexnet_ray.model.dropout import step_key

    model = AlexNet(**{**SMALL, "dropout": 0.5}).train()
    x = torch.randn(4, 3, 64, 64)
    model.set_dropout_step(1, 2, 3)
    first = model(x)
    model.set_dropout_step(1, 2, 3)
    assert torch.equal(model(x), first)
    model.set_dropout_step(1, 2, 4)
    assert not torch.equal(model(x), first)
    model.eval()
    assert torch.equal(model(x), model(x))
    assert model.state_dict().keys() == AlexNet(**SMALL).state_dict().keys()  # no new checkpoint entries
    model.set_dropout_step(9, 9, 9, row_offset=5, stage=2)  # a pipelined step keys one stage's dropout
    assert model.dropout6.words.tolist() == [*step_key(9, 9, 9, 6), 5]
    assert model.dropout7.words.tolist() == [*step_key(1, 2, 4, 7), 0]
    model.set_dropout_step(9, 9, 9, row_offset=7, stage=0)  # stage 0 runs no dropout
    assert model.dropout6.words.tolist()[2] == 5 and model.dropout7.words.tolist()[2] == 0


def test_built_from_a_model_config_or_its_fields_alike():
    config = ModelConfig(**SMALL)
    torch.manual_seed(0)
    from_config = AlexNet(config)
    torch.manual_seed(0)
    from_fields = AlexNet(**SMALL)
    assert from_config.config == from_fields.config == config
    assert all(torch.equal(a, b) for a, b in zip(from_config.state_dict().values(), from_fields.state_dict().values()))
    wider = AlexNet(config, width=0.5)  # a field by keyword replaces the config's
    assert wider.config.width == 0.5 and config.width == 0.25 and wider.conv1.out_channels == 48
    tower = Tower(1, 2, config)
    assert tower.config == config and tower.conv1.out_channels == 12 and tower.fc8.out_features == 5
    with pytest.raises(TypeError, match="expected a ModelConfig, got int"):
        AlexNet(10)
