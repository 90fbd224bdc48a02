"""The benchmark presets are read from architecture definitions and match the published sizes."""

import pytest

from benchmarks.presets import PRESETS, leading_slice, numel, parameter_shapes, resolve_presets

# Published parameter counts (tensors, elements) of the architectures.
KNOWN_SIZES = {
    "resnet18": (62, 11_173_962),
    "wrn28_10": (80, 36_479_194),
    "vit_b16": (152, 86_567_656),
    "gpt2": (148, 124_439_808),
}


@pytest.mark.parametrize("name", sorted(KNOWN_SIZES))
def test_preset_has_the_published_parameter_count(name):
    shapes = parameter_shapes(name)
    assert (len(shapes), numel(shapes)) == KNOWN_SIZES[name]


def test_tiny_preset_is_thousands_of_tiny_tensors():
    shapes = parameter_shapes("tiny")
    assert len(shapes) >= 1000
    assert max(numel((s,)) for s in shapes) <= 64


def test_preset_spec_takes_a_name_a_comma_list_or_all_and_rejects_unknown_names():
    assert resolve_presets("all") == list(PRESETS)
    assert resolve_presets("vit_b16, resnet18") == ["vit_b16", "resnet18"]
    with pytest.raises(ValueError, match="--preset 'resnet_18' is not a preset"):
        resolve_presets("resnet18,resnet_18")
    with pytest.raises(ValueError, match="--preset 'resnet50' is not a preset"):
        resolve_presets("resnet50")


def test_leading_slice_stays_within_budget_but_keeps_at_least_one_tensor():
    shapes = parameter_shapes("gpt2")
    sliced = leading_slice(shapes, 1 << 20)
    assert sliced == shapes[: len(sliced)]
    assert len(sliced) == 1  # the token embedding alone exceeds the budget
    assert numel(leading_slice(parameter_shapes("resnet18"), 1 << 20)) <= 1 << 20
