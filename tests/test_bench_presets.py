"""The benchmark presets are read from architecture definitions and match the published sizes."""

import pytest

from benchmarks.presets import PRESETS, numel, parameter_shapes, resolve_presets, subset_within

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


def test_gate_subset_fits_the_budget_in_order_and_skips_oversized_tensors():
    shapes = parameter_shapes("gpt2")
    subset = subset_within(shapes, 1 << 22)
    assert numel(subset) <= 1 << 22
    assert shapes[0] not in subset  # the 38.6 M-element token embedding
    assert len(subset) > 10
    remaining = iter(shapes)
    assert all(shape in remaining for shape in subset)  # a subsequence: the model's order is kept
    assert subset_within(((5,), (7,)), 3) == ((5,),)
