"""Fixtures of the `pixelprune distill` tests: small screenshots with ScreenSpot-v2 annotations
(read-only: copy them to change them), and the tiny random-weight checkpoint of tests/conftest.py."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("distill_testlib")

from distill_testlib import screenspot_rows, write_json, write_shots  # noqa: E402


@pytest.fixture(scope="session")
def shots_dir(tmp_path_factory):
    """Six screenshots (three sizes) and screenspot_mobile_v2.json: two instructions on each."""
    folder = tmp_path_factory.mktemp("distill-shots")
    write_json(folder / "screenspot_mobile_v2.json", screenspot_rows(write_shots(folder)))
    return folder
