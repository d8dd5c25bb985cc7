"""LR schedule table. Run: pytest tests/test_schedule.py"""

import pytest

from raypatch.optim import lr_at


@pytest.mark.parametrize("step,expected", [(0, 0.25), (3, 1.0), (4, 1.0), (8, 0.5), (12, 0.0), (20, 0.0)])
def test_warmup_then_cosine(step, expected):
    assert lr_at(step, 12, lr=1.0, warmup_steps=4) == pytest.approx(expected)


def test_min_lr_and_no_warmup():
    assert lr_at(0, 10, lr=1.0, warmup_steps=0, min_lr=0.1) == pytest.approx(1.0)
    assert lr_at(10, 10, lr=1.0, warmup_steps=0, min_lr=0.1) == pytest.approx(0.1)
