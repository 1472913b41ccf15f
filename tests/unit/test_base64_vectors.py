"""Vectors sent as base64 (encoding_format base64): whatever the rows, a request is either accepted as
exactly the float32 values their bytes hold, or refused with an InvalidArgument naming the field."""

from __future__ import annotations

import base64
import re

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydantic import ValidationError

from service.api import schemas
from service.api.errors import validation_error

encoded_bytes = st.binary(max_size=20).map(lambda data: base64.b64encode(data).decode())
rows = st.lists(st.one_of(encoded_bytes, st.text(max_size=12), st.lists(st.floats(width=32), max_size=3),
                          st.none()), max_size=4)


@settings(max_examples=400, deadline=None)
@given(rows)
def test_base64_rows_are_their_float32_bytes_or_refused_naming_a_row(queries):
    try:
        request = schemas.RetrieveRequest.model_validate({"queries": queries, "encoding_format": "base64"})
    except ValidationError as exc:
        error = validation_error(exc)
        assert re.fullmatch(r"queries(\[\d+\])?", error.field), error.field
        return
    expected = np.frombuffer(b"".join(base64.b64decode(row) for row in queries), dtype="<f4")
    assert request.queries.dtype == np.float32 and request.queries.shape[0] == len(queries)
    np.testing.assert_array_equal(request.queries.ravel(), expected)
    assert np.isfinite(request.queries).all()


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 6)),
              elements=st.floats(width=32, allow_nan=False, allow_infinity=False)))
def test_finite_float32_matrices_travel_bit_for_bit(matrix):
    store = schemas.StoreRequest.model_validate({
        "patterns": [base64.b64encode(row.astype("<f4").tobytes()).decode() for row in matrix],
        "encoding_format": "base64"})
    assert store.patterns.tobytes() == matrix.tobytes()  # -0.0 and subnormals included
