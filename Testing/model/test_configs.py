"""The two registries (network configs, downloadable weights) share one naming pattern, and the
configs' block-style variants are spelled out, not built from strings."""

from __future__ import annotations

import dataclasses

import pytest

import fastsam3d
from fastsam3d import configs, weights
from fastsam3d.configs import BLOCK_STYLE_VARIANTS, CONFIGS, get_config, with_block_style


def test_both_registries_follow_one_pattern():
    assert [c.name for c in configs.list_configs()] == list(CONFIGS)
    assert [w.name for w in weights.list_weights()] == list(weights.WEIGHTS)
    for name in CONFIGS:
        assert get_config(name) is CONFIGS[name]
    for name in weights.WEIGHTS:
        assert weights.get_weights(name) is weights.WEIGHTS[name]
    with pytest.raises(ValueError, match="known: fastsam3d, sam-med3d-turbo"):
        get_config("fastsam")
    with pytest.raises(ValueError, match="known names: fastsam3d, sam-med3d-turbo"):
        weights.get_weights("fastsam")


def test_top_level_names_are_the_registry_functions():
    assert fastsam3d.list_configs is configs.list_configs
    assert fastsam3d.get_config is configs.get_config
    assert fastsam3d.list_weights is weights.list_weights
    assert fastsam3d.get_weights is weights.get_weights
    assert fastsam3d.WeightsInfo is weights.WeightsInfo
    assert fastsam3d.build.MODEL_CONFIGS is CONFIGS  # the old name, the same dict


def test_list_models_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="list_configs"):
        assert fastsam3d.list_models() == sorted(CONFIGS)


def test_block_style_variants_differ_only_in_block_style():
    ignore = {"name", "description", "block_style"}
    for (name, style), variant in BLOCK_STYLE_VARIANTS.items():
        a, b = CONFIGS[name], CONFIGS[variant]
        assert a.block_style != style and b.block_style == style
        same = {f.name for f in dataclasses.fields(a)} - ignore
        assert {k: getattr(a, k) for k in same} == {k: getattr(b, k) for k in same}


def test_with_block_style_names_the_registered_variant():
    turbo = CONFIGS["sam-med3d-turbo"]
    assert with_block_style(turbo, "fastsam3d") is CONFIGS["sam-med3d-turbo-fastsam3d-block"]
    assert with_block_style(turbo, "standard") is turbo
    # No registered variant, or a changed copy of a registered config: the style is replaced.
    fast = with_block_style(CONFIGS["fastsam3d"], "standard")
    assert (fast.name, fast.block_style) == ("fastsam3d", "standard")
    small = get_config("sam-med3d-turbo", depth=2)
    expected = dataclasses.replace(small, block_style="fastsam3d")
    assert with_block_style(small, "fastsam3d") == expected
