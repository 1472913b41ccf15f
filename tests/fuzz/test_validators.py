"""Property tests for the request validators: whatever the input, a request is either accepted as a
well-formed value or refused with an InvalidArgument naming a field — never anything else."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from service.api import schemas
from service.api.auth import ApiKeys, key_hash
from service.api.errors import field_path, validation_error
from service.banks.registry import BANK_NAME, check_bank_name
from service.errors import InvalidArgument, Unauthenticated

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-10**6, 10**6),
                    st.text(max_size=3), st.none(), st.booleans())
rows = st.lists(st.lists(numbers, max_size=5), max_size=5)


def validated(model, body: dict, fields: tuple[str, ...]):
    """`body` as a `model`, or None where it is refused with an InvalidArgument naming one of `fields`."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = validation_error(exc)
        assert isinstance(error, InvalidArgument)
        assert error.field.split("[")[0].split(".")[0] in fields, error.field
        return None


@settings(max_examples=300, deadline=None)
@given(queries=rows, steps=st.one_of(st.none(), st.integers(-5, 20_000)))
def test_retrieve_request_is_rectangular_finite_or_refused_with_a_field(queries, steps):
    body = {"queries": queries} | ({} if steps is None else {"steps": steps})
    request = validated(schemas.RetrieveRequest, body, ("queries", "steps"))
    if request is None:
        return
    widths = {len(q) for q in request.queries}
    assert len(widths) == 1 and widths != {0}
    assert all(math.isfinite(v) for q in request.queries for v in q)
    assert steps is None or 1 <= steps <= 10_000


@settings(max_examples=200, deadline=None)
@given(queries=st.lists(st.lists(st.floats(-1, 1, width=32), min_size=1, max_size=4), min_size=1, max_size=4),
       mask=st.lists(st.lists(st.booleans(), max_size=5), max_size=5))
def test_complete_request_mask_matches_queries_or_names_mask(queries, mask):
    request = validated(schemas.CompleteRequest, {"queries": queries, "mask": mask}, ("queries", "mask"))
    if request is None:
        return
    assert [len(m) for m in request.mask] == [len(q) for q in request.queries]


@settings(max_examples=200, deadline=None)
@given(image=rows, mask=st.lists(st.lists(st.booleans(), max_size=5), max_size=5))
def test_image_request_pixels_in_unit_interval(image, mask):
    request = validated(schemas.CompleteImageRequest, {"image": image, "mask": mask}, ("image", "mask"))
    if request is None:
        return
    assert all(0.0 <= v <= 1.0 for row in request.image for v in row)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=70))
def test_bank_names_never_escape_their_pattern(name):
    try:
        check_bank_name(name)
    except InvalidArgument as exc:
        assert exc.field == "bank"
        assert not BANK_NAME.fullmatch(name)
        return
    assert BANK_NAME.fullmatch(name) and "/" not in name and ".." not in name


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=60)))
def test_authorization_header_parsing_never_crashes(header):
    keys = ApiKeys({key_hash("ams_right"): "acme"})
    try:
        tenant = keys.tenant(header)
    except Unauthenticated:
        return
    assert tenant == "acme" and header.split()[-1] == "ams_right"


@pytest.mark.parametrize("loc, expected", [
    (("body", "queries", 0, 3), "queries[0][3]"),
    (("body", "params", "beta"), "params.beta"),
    (("path", "bank"), "bank"),
    ((), "body"),
])
def test_field_paths(loc, expected):
    assert field_path(loc) == expected
