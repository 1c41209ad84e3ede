"""agent_client.messages: pruning settings in, GroundResult out (the keep mask checked against
the response's model size), no server."""

from __future__ import annotations

import numpy as np
import pytest

from agent_client.messages import GroundingError, GroundResult, keep_from_pb, pruning_settings
from pixelprune_api.grounding.v1 import grounding_pb2 as pb


def test_pruning_settings():
    s = pruning_settings("serpentine", "mae", 0.25, prune=True)
    assert (s.method, s.metric, s.tau, s.disabled) == (pb.PruningSettings.METHOD_SERPENTINE,
                                                       pb.PruningSettings.METRIC_MAE, 0.25, False)
    assert not pruning_settings().HasField("tau") and pruning_settings(prune=False).disabled
    for kwargs in ({"method": "zigzag"}, {"metric": "l2"}, {"tau": -0.1}, {"tau": float("nan")}, {"tau": 2.0}):
        with pytest.raises(ValueError):
            pruning_settings(**kwargs)


def response(rows: int = 3, cols: int = 3, bits: bytes | None = b"\xb8\x80") -> pb.GroundResponse:
    """A 96x96 answer (3 x 3 blocks) keeping the blocks 101 / 110 / 001."""
    r = pb.GroundResponse(found=True, point=pb.Point(x=10.0, y=20.0), point_normalized=pb.Point(x=0.1, y=0.2),
                          kept_blocks=5, total_blocks=9, retain_ratio=5 / 9, image_width=100, image_height=100,
                          model_width=96, model_height=96)
    if bits is not None:
        r.keep_mask.CopyFrom(pb.KeepMask(rows=rows, cols=cols, bits=bits))
    return r


def test_the_keep_mask_of_a_response():
    result = GroundResult.from_pb(response())
    assert result.keep.dtype == np.bool_
    assert result.keep.tolist() == [[True, False, True], [True, True, False], [False, False, True]]
    assert result.to_json_dict()["keep_mask"] == {"rows": 3, "cols": 3, "bits": "uIA="}  # b"\xb8\x80"
    absent = GroundResult.from_pb(response(bits=None))
    assert absent.keep is None and absent.to_json_dict()["keep_mask"] is None
    assert absent == result  # the mask is not part of ==


@pytest.mark.parametrize("rows, cols, bits, message", [
    (3, 4, b"\xb8\x80", "a 3x4 keep mask for a 96x96 model image (3x3 blocks)"),
    (3, 3, b"\xb8", "damaged keep mask: a 3x3 keep mask takes 2 bytes, got 1"),
    (3, 3, b"\xb8\x81", "damaged keep mask: keep mask padding bits are not zero"),
])
def test_a_bad_keep_mask_is_a_grounding_error(rows, cols, bits, message):
    with pytest.raises(GroundingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        keep_from_pb(response(rows, cols, bits))
