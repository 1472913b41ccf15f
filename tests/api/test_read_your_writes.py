"""Reads through the gateway that wrote ask for the write's version by themselves: a bank deleted and
created again under the same name starts again from version 0."""

from __future__ import annotations


def test_a_bank_created_again_reads_at_once(client, bank_name):
    for patterns in ([[1, 0]], [[0, 1]], [[1, 1]]):  # the first bank reaches version 3
        assert client.put(f"/v1/banks/{bank_name}", json={"kind": "modern", "dim": 2}).status_code in (201, 409)
        assert client.post(f"/v1/banks/{bank_name}/store", json={"patterns": patterns}).status_code == 200
    assert client.delete(f"/v1/banks/{bank_name}").status_code == 204
    assert client.put(f"/v1/banks/{bank_name}", json={"kind": "modern", "dim": 2}).status_code == 201
    assert client.post(f"/v1/banks/{bank_name}/store", json={"patterns": [[1, 0]], "ids": ["a"]}).json()["version"] == 1
    r = client.post(f"/v1/banks/{bank_name}/retrieve", json={"queries": [[0.9, 0.1]]})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["nearest"]["id"] == "a"
    info = client.get(f"/v1/banks/{bank_name}").json()
    assert (info["version"], info["count"]) == (1, 1)
