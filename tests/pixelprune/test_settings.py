"""PruneSettings: validated once when built, one spelling for the CLI, a cache key."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pixelprune.settings import METHODS, METRICS, PruneSettings


@pytest.mark.parametrize("kwargs, fragment", [
    ({"method": "zigzag"}, "unknown pruning method 'zigzag'"),
    ({"metric": "l2"}, "unknown pruning metric 'l2'"),
    ({"tau": -1.0}, "tau must be a finite number in [0, 1]"),
    ({"tau": 1.5}, "tau must be a finite number in [0, 1]"),
    ({"tau": float("nan")}, "tau must be"),
    ({"tau": np.float64("inf")}, "tau must be"),
    ({"tau": "0.02"}, "tau must be"),
    ({"tau": None}, "tau must be"),
    ({"tau": True}, "tau must be"),
    ({"enabled": "yes"}, "enabled must be a bool"),
])
def test_bad_settings_are_refused_when_built(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        PruneSettings(**kwargs)


def test_numpy_scalars_are_numbers_and_tau_becomes_a_float():
    settings = PruneSettings(tau=np.float32(0.25))
    assert settings.tau == 0.25 and type(settings.tau) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.tau = 0.5


def test_key_identifies_what_prunes_the_same():
    assert PruneSettings().key == (True, "pred2d", "max", 0.0)
    assert PruneSettings(tau=0).key == PruneSettings(tau=0.0).key
    # every way of turning pruning off keeps every block: one key
    assert PruneSettings(enabled=False, method="raster", tau=0.3).key == PruneSettings.OFF.key == (False,)
    assert len({PruneSettings(method=m, metric=k).key for m in METHODS for k in METRICS}) == 6


@pytest.mark.parametrize("text, expected", [
    ("full", PruneSettings(enabled=False)),
    ("pred2d", PruneSettings()),
    ("raster:mae", PruneSettings(method="raster", metric="mae")),
    ("pred2d:max:0.02", PruneSettings(tau=0.02)),
    (" serpentine:max:0 ", PruneSettings(method="serpentine")),
])
def test_parse(text, expected):
    assert PruneSettings.parse(text) == expected
    assert PruneSettings.parse(str(expected)) == expected  # str() is parse's spelling


@pytest.mark.parametrize("text", ["", "pred2d:max:0.02:x", "pred2d:max:abc", "zigzag", "pred2d:l1", ":max"])
def test_parse_refuses_what_it_cannot_read(text):
    with pytest.raises(ValueError):
        PruneSettings.parse(text)
