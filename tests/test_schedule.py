"""LR schedules: exact values, the paper's plateau rule, warm-up, and resume from state_dict."""

import math

import pytest
import torch

from alexnet_ray.train.config import ScheduleConfig
from alexnet_ray.train.schedule import make_lr_schedule


def sched(base_lr=0.01, epochs=90, **kwargs):
    return make_lr_schedule(ScheduleConfig(**kwargs), base_lr, epochs)


def test_plateau_divides_by_ten_at_most_three_times():
    s = sched(kind="plateau", plateau_patience=1, plateau_max_decays=3)
    errors = [0.9, 0.8, 0.8, 0.8, 0.7, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75]
    lrs, decayed = [], []
    for epoch, err in enumerate(errors):
        lrs.append(s.lr(epoch))
        decayed.append(s.observe(err))
    # two epochs without improvement (> patience=1) -> decay; best 0.7 is never beaten after epoch 4
    assert decayed == [False, False, False, True, False, False, True, False, True, False, False, False, False]
    assert lrs[:4] == [0.01] * 4
    assert lrs[4:7] == pytest.approx([1e-3] * 3, rel=1e-12)
    assert lrs[7:9] == pytest.approx([1e-4] * 2, rel=1e-12)
    assert lrs[9:] == pytest.approx([1e-5] * 4, rel=1e-12)
    assert s.lr(100) == pytest.approx(1e-5, rel=1e-12)
    assert s.decays == 3  # capped at plateau_max_decays
    assert s.best == 0.7


def test_plateau_threshold_requires_a_real_improvement():
    s = sched(kind="plateau", plateau_patience=0, plateau_threshold=0.01)
    assert s.observe(0.5) is False
    assert s.observe(0.495) is True  # better, but not by more than 0.01
    assert s.lr(2) == pytest.approx(0.001)
    assert s.observe(0.48) is False  # beats 0.495 - 0.01


def test_step_schedule_exact_values():
    s = sched(base_lr=0.1, kind="step", step_size=30, step_gamma=0.1)
    assert [s.lr(e) for e in (0, 29, 29.99)] == [0.1, 0.1, 0.1]
    assert s.lr(30) == pytest.approx(0.01, abs=1e-15)
    assert s.lr(60) == pytest.approx(0.001, abs=1e-15)
    assert s.observe(0.5) is False and s.observe(0.9) is False and s.lr(60) == pytest.approx(0.001)


def test_cosine_with_warmup_exact_values():
    s = sched(base_lr=0.1, epochs=10, kind="cosine", warmup_epochs=2, warmup_start_factor=0.1, min_lr=0.0)
    assert s.lr(0) == pytest.approx(0.01)  # warm-up starts at 10 %
    assert s.lr(1) == pytest.approx(0.055)  # halfway through warm-up
    assert s.lr(0.5) == pytest.approx(0.1 * (0.1 + 0.9 * 0.25))  # fractional epochs for per-step warm-up
    assert s.lr(2) == pytest.approx(0.1)  # warm-up over, cosine starts at the top
    assert s.lr(6) == pytest.approx(0.05)  # halfway: (1 + cos(pi/2)) / 2
    assert s.lr(10) == pytest.approx(0.0, abs=1e-15)
    assert s.lr(4) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 2 / 8)))


def test_cosine_min_lr_floor():
    s = sched(base_lr=0.1, epochs=4, kind="cosine", min_lr=0.01)
    assert s.lr(4) == pytest.approx(0.01) and s.lr(40) == pytest.approx(0.01)
    assert s.lr(2) == pytest.approx(0.055)


def test_warmup_applies_to_plateau_and_ignores_warmup_epochs_for_decay():
    s = sched(kind="plateau", warmup_epochs=2, warmup_start_factor=0.5, plateau_patience=0)
    assert s.lr(0) == pytest.approx(0.005) and s.lr(1) == pytest.approx(0.0075) and s.lr(2) == 0.01
    assert s.observe(0.9) is False
    assert s.observe(0.95) is False  # worse, but still in warm-up
    assert s.observe(0.95) is True


def test_state_dict_resume_continues_exactly():
    errors = [0.9, 0.8, 0.85, 0.86, 0.7, 0.71, 0.72, 0.73, 0.6, 0.61, 0.62]
    full = sched(kind="plateau", plateau_patience=1)
    full_lrs = []
    for e, err in enumerate(errors):
        full_lrs.append(full.lr(e))
        full.observe(err)

    first = sched(kind="plateau", plateau_patience=1)
    lrs = []
    for e, err in enumerate(errors[:5]):
        lrs.append(first.lr(e))
        first.observe(err)
    state = first.state_dict()
    # a checkpoint round trip: the state must load under weights_only=True
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    resumed = sched(kind="plateau", plateau_patience=1)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for e, err in enumerate(errors[5:], start=5):
        lrs.append(resumed.lr(e))
        resumed.observe(err)
    assert lrs == full_lrs
    assert resumed.state_dict() == full.state_dict()
    assert full.decays == 3


def test_state_dict_of_another_kind_is_refused():
    with pytest.raises(ValueError, match="schedule.kind='cosine'"):
        sched(kind="cosine").load_state_dict(sched(kind="plateau").state_dict())


def test_bad_arguments():
    with pytest.raises(ValueError, match="base_lr"):
        sched(base_lr=0)
    with pytest.raises(ValueError, match="schedule.kind"):
        sched(kind="linear")
