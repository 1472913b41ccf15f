"""`"encoding_format": "base64"` on store, retrieve and complete: each vector a base64 string of
little-endian float32, states answered the same way, exactly the float32 values of the float answers."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.api.test_rest import create, error


def encoded(rows) -> list[str]:
    return [base64.b64encode(np.asarray(row, dtype="<f4").tobytes()).decode() for row in rows]


def decoded(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


@pytest.fixture()
def bank(client, bank_name):
    """A modern bank of 5 random 6-dim patterns (ids p0…p4) and the patterns as float32."""
    create(client, bank_name, "modern", 6, beta=4.0)
    patterns = np.random.default_rng(7).standard_normal((5, 6)).astype(np.float32)
    ids = [f"p{i}" for i in range(5)]
    r = client.post(f"/v1/banks/{bank_name}/store", json={"patterns": patterns.tolist(), "ids": ids})
    assert r.status_code == 200, r.text
    return bank_name, patterns


@pytest.mark.parametrize("operation", ["retrieve", "complete"])
def test_base64_answers_are_the_float32_of_the_float_answers(client, bank, operation):
    name, patterns = bank
    # awkward float32 values (not short decimals), so any float64 or text rounding would show
    queries = (patterns[:3] + np.float32(0.3) * np.random.default_rng(8).standard_normal((3, 6))).astype(np.float32)
    options = {"steps": 4, "trace": True}
    if operation == "complete":
        options["mask"] = [[True, False] * 3, [False] * 6, [True] * 3 + [False] * 3]
    as_floats = client.post(f"/v1/banks/{name}/{operation}", json={"queries": queries.tolist(), **options})
    as_base64 = client.post(f"/v1/banks/{name}/{operation}",
                            json={"queries": encoded(queries), "encoding_format": "base64", **options})
    assert as_floats.status_code == as_base64.status_code == 200, (as_floats.text, as_base64.text)
    for plain, packed in zip(as_floats.json()["results"], as_base64.json()["results"], strict=True):
        assert isinstance(packed["state"], str)
        state = decoded(packed["state"])
        assert state.shape == (6,)
        np.testing.assert_array_equal(state, np.asarray(plain["state"], dtype=np.float32))
        assert {k: v for k, v in packed.items() if k != "state"} == {k: v for k, v in plain.items() if k != "state"}
    if operation == "complete":  # clamped entries keep the query's exact float32 bits
        state = decoded(as_base64.json()["results"][0]["state"])
        np.testing.assert_array_equal(state[::2], queries[0, ::2])


def test_store_with_base64_then_retrieve_with_floats(client, bank, bank_name):
    _, patterns = bank
    twin = f"{bank_name[:40]}-b64"
    create(client, twin, "modern", 6, beta=4.0)
    r = client.post(f"/v1/banks/{twin}/store", json={"patterns": encoded(patterns), "encoding_format": "base64",
                                                     "ids": [f"p{i}" for i in range(5)]})
    assert r.status_code == 200, r.text
    assert r.json() == {"ids": [f"p{i}" for i in range(5)], "count": 5, "version": 1}
    # the checksum is over the stored float32 bytes: both encodings stored the same patterns
    assert client.get(f"/v1/banks/{twin}").json()["checksum"] == client.get(f"/v1/banks/{bank[0]}").json()["checksum"]
    result = client.post(f"/v1/banks/{twin}/retrieve", json={"queries": [patterns[3].tolist()]}).json()["results"][0]
    assert result["nearest"]["id"] == "p3" and isinstance(result["state"], list)
    client.delete(f"/v1/banks/{twin}")


NAN_ROW = encoded([[1, float("nan"), 0, 0, 0, 0]])[0]
INF_ROW = encoded([[1, 0, 0, 0, 0, float("-inf")]])[0]
SIX = encoded([[0.5] * 6])[0]


@pytest.mark.parametrize(("rows", "field", "reason"), [
    ([SIX, SIX[:-4] + "AAA="], "[1]", "not a whole"),                     # 23 bytes: not a multiple of 4
    ([SIX, encoded([[0.5] * 5])[0]], "[1]", "row 0 has 6"),               # a different dim from row 0
    ([SIX, "not base64!"], "[1]", "invalid base64"),
    (["AAAA" * 5 + "A"], "[0]", "invalid base64"),                        # bad padding
    ([NAN_ROW], "[0]", "finite"),
    ([SIX, INF_ROW], "[1]", "finite"),
    ([SIX, [0.5] * 6], "[1]", "base64 string"),                           # a float row in a base64 request
    ([], "", "non-empty"),
])
@pytest.mark.parametrize("operation", ["store", "retrieve", "complete"])
def test_bad_base64_vectors_are_422_naming_the_row(client, bank, operation, rows, field, reason):
    name, _ = bank
    key = "patterns" if operation == "store" else "queries"
    body = {key: rows, "encoding_format": "base64"}
    if operation == "complete":
        body["mask"] = [[True] * 6 for _ in rows] or [[True]]
    body = error(client.post(f"/v1/banks/{name}/{operation}", json=body), 422, key + field)
    assert reason in body["message"], body
    assert client.get(f"/v1/banks/{name}").json()["count"] == 5


def test_encoding_format_is_checked_and_decides_the_row_type(client, bank):
    name, _ = bank
    error(client.post(f"/v1/banks/{name}/retrieve", json={"queries": [SIX], "encoding_format": "int8"}),
          422, "encoding_format")
    error(client.post(f"/v1/banks/{name}/retrieve", json={"queries": [SIX]}), 422, "queries[0]")  # float is the default
    # decoded rows meet the same bank checks as float rows: here the bank's dim
    body = error(client.post(f"/v1/banks/{name}/retrieve",
                             json={"queries": encoded([[0.5] * 4]), "encoding_format": "base64"}), 422, "queries")
    plain = error(client.post(f"/v1/banks/{name}/retrieve", json={"queries": [[0.5] * 4]}), 422, "queries")
    assert body == plain
    # the mask of complete stays booleans
    error(client.post(f"/v1/banks/{name}/complete", json={"queries": [SIX], "encoding_format": "base64",
                                                          "mask": [[True] * 5]}), 422, "mask")
