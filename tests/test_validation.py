"""Bad input gets a ValueError or TypeError that names the problem, from every implementation."""

import pytest
import torch

import lsr


def call(impl, logits, target, smoothing=0.1, reduction="mean", **kwargs):
    return impl.loss(logits, target, smoothing, reduction, **kwargs)


@pytest.mark.parametrize("smoothing", [-0.1, 1.5, float("nan")])
def test_smoothing_outside_unit_interval(impl, smoothing):
    with pytest.raises(ValueError, match=r"smoothing must be in \[0, 1\]"):
        call(impl, torch.randn(3, 4), torch.tensor([0, 1, 2]), smoothing=smoothing)


def test_smoothing_not_a_number(impl):
    with pytest.raises(TypeError, match="smoothing must be a float"):
        call(impl, torch.randn(3, 4), torch.tensor([0, 1, 2]), smoothing="0.1")


def test_unknown_reduction(impl):
    with pytest.raises(ValueError, match="reduction must be one of"):
        call(impl, torch.randn(3, 4), torch.tensor([0, 1, 2]), reduction="avg")


def test_integer_logits(impl):
    with pytest.raises(TypeError, match="floating point"):
        call(impl, torch.randint(0, 5, (3, 4)), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("target", [torch.tensor([0.0, 1.0, 2.0]), torch.tensor([True, False, True])])
def test_non_integer_target(impl, target):
    with pytest.raises(TypeError, match="target must be an integer tensor"):
        call(impl, torch.randn(3, 4), target)


@pytest.mark.parametrize(
    "logits_shape,target_shape", [((3, 4), (4,)), ((3, 4), (3, 1)), ((2, 4, 5), (2, 4)), ((4,), (1,))]
)
def test_shapes_that_do_not_match(impl, logits_shape, target_shape):
    with pytest.raises(ValueError, match="does not match input shape"):
        call(impl, torch.randn(logits_shape), torch.zeros(target_shape, dtype=torch.long))


def test_scalar_logits(impl):
    with pytest.raises(ValueError, match="class dimension"):
        call(impl, torch.tensor(1.5), torch.tensor(0))


@pytest.mark.parametrize("bad_value", [4, -1, 100])
def test_target_out_of_range_names_value_and_classes(impl, bad_value):
    target = torch.tensor([0, bad_value, 2])
    with pytest.raises(ValueError, match=rf"target value {bad_value} is out of range for C=4"):
        call(impl, torch.randn(3, 4), target)


def test_ignore_index_is_not_out_of_range(impl):
    assert torch.isfinite(call(impl, torch.randn(3, 4), torch.tensor([0, -100, 2])))


def test_too_few_classes_for_sparse():
    with pytest.raises(ValueError, match="at least 2 classes, got C=1"):
        lsr.sparse_label_smoothing(torch.randn(3, 1), torch.zeros(3, dtype=torch.long), 0.1)


@pytest.mark.parametrize(
    "weight,error,match",
    [
        (torch.ones(3), ValueError, r"weight must have shape \(4,\)"),
        (torch.ones(4, dtype=torch.long), TypeError, "floating point"),
    ],
)
def test_bad_weight(impl, weight, error, match):
    if not impl.supports_weight:
        pytest.skip("no weights")
    with pytest.raises(error, match=match):
        call(impl, torch.randn(3, 4), torch.tensor([0, 1, 2]), weight=weight)


def test_modules_reject_bad_arguments_at_construction():
    with pytest.raises(ValueError, match="smoothing"):
        lsr.SparseLSRLoss(smoothing=2.0)
    with pytest.raises(ValueError, match="reduction"):
        lsr.LSRLoss(reduction="batchmean")


def test_registry_lookup_names_the_choices():
    with pytest.raises(KeyError, match="registered: "):
        lsr.get("no-such-loss")
    with pytest.raises(ValueError, match="already registered"):
        lsr.register(lsr.get("sparse"))
