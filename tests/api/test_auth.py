"""API keys and tenant isolation over real sockets (REST and gRPC)."""

from __future__ import annotations

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.api.auth import create_key
from service.api.pb import amserve_pb2 as pb
from service.api.pb import amserve_pb2_grpc as pb_grpc
from tests.harness import ServerProcess


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    keys_file = root / "keys.json"
    keys = {tenant: create_key(keys_file, tenant) for tenant in ("acme", "globex")}
    assert all(key not in keys_file.read_text() for key in keys.values())  # only hashes at rest
    with ServerProcess(root / "data", extra_args=["--api-keys-file", str(keys_file), "--model", "none"]) as proc:
        yield proc, keys


def as_tenant(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def test_missing_or_wrong_key_is_401(secured):
    server, keys = secured
    for headers in ({}, {"Authorization": "Bearer ams_wrong"}, {"Authorization": f"Basic {keys['acme']}"}):
        r = httpx.get(f"{server.url}/v1/banks", headers=headers)
        assert r.status_code == 401, r.text
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "unauthenticated"
    r = httpx.post(f"{server.url}/v1/generate", json={"prompt": "hi"})
    assert r.status_code == 401


def test_probes_and_metrics_stay_open(secured):
    server, _ = secured
    assert httpx.get(f"{server.url}/healthz/live").status_code == 200
    assert httpx.get(f"{server.url}/healthz/ready").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_tenants_cannot_see_or_touch_each_others_banks(secured):
    server, keys = secured
    acme, globex = as_tenant(keys["acme"]), as_tenant(keys["globex"])
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.put("/v1/banks/shared", json={"kind": "modern", "dim": 2}, headers=acme).status_code == 201
        assert c.post("/v1/banks/shared/store", json={"patterns": [[1, 0]], "ids": ["secret"]}, headers=acme).status_code == 200
        # globex learns nothing: every operation on acme's bank name is a plain 404
        assert c.get("/v1/banks/shared", headers=globex).status_code == 404
        assert c.post("/v1/banks/shared/retrieve", json={"queries": [[1, 0]]}, headers=globex).status_code == 404
        assert c.post("/v1/banks/shared/store", json={"patterns": [[0, 1]]}, headers=globex).status_code == 404
        assert c.delete("/v1/banks/shared/patterns/secret", headers=globex).status_code == 404
        assert c.delete("/v1/banks/shared", headers=globex).status_code == 404
        assert c.get("/v1/banks", headers=globex).json()["banks"] == []
        # the same name is free for globex, and independent
        assert c.put("/v1/banks/shared", json={"kind": "rbf", "dim": 3}, headers=globex).status_code == 201
        mine = c.get("/v1/banks/shared", headers=acme).json()
        assert {k: mine[k] for k in ("name", "kind", "dim", "count")} == {"name": "shared", "kind": "modern", "dim": 2,
                                                                        "count": 1}
        assert [b["name"] for b in c.get("/v1/banks", headers=acme).json()["banks"]] == ["shared"]
        assert c.get("/v1/banks/shared", headers=globex).json()["kind"] == "rbf"
        result = c.post("/v1/banks/shared/retrieve", json={"queries": [[1, 0]]}, headers=acme).json()["results"][0]
        assert result["nearest"]["id"] == "secret"


def test_grpc_metadata_carries_the_key(secured):
    server, keys = secured
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.AmserveStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ListBanks(pb.ListBanksRequest())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            stub.ListBanks(pb.ListBanksRequest(), metadata=(("authorization", "Bearer nope"),))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        acme = (("authorization", f"Bearer {keys['acme']}"),)
        globex = (("authorization", f"Bearer {keys['globex']}"),)
        stub.CreateBank(pb.CreateBankRequest(bank="grpc-only", kind="modern", dim=2), metadata=acme)
        assert "grpc-only" in [b.name for b in stub.ListBanks(pb.ListBanksRequest(), metadata=acme).banks]
        assert "grpc-only" not in [b.name for b in stub.ListBanks(pb.ListBanksRequest(), metadata=globex).banks]
        with pytest.raises(grpc.RpcError) as info:
            stub.GetBank(pb.GetBankRequest(bank="grpc-only"), metadata=globex)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_no_metric_names_a_bank_or_a_tenant(secured):
    """/metrics is open by default: after traffic of two tenants to several banks, no series carries a
    bank or tenant label, nor a bank's or tenant's name in any label (bank sizes are in the API)."""
    server, keys = secured
    banks = [f"metered-{i}" for i in range(3)]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for key in keys.values():
            for bank in banks:
                assert c.put(f"/v1/banks/{bank}", json={"kind": "modern", "dim": 2}, headers=as_tenant(key)).status_code == 201
                c.post(f"/v1/banks/{bank}/store", json={"patterns": [[1, 0]]}, headers=as_tenant(key)).raise_for_status()
                c.post(f"/v1/banks/{bank}/retrieve", json={"queries": [[1, 0]]}, headers=as_tenant(key)).raise_for_status()
        text = c.get("/metrics").text
    labels = [sample.labels for family in text_string_to_metric_families(text) for sample in family.samples]
    assert any(label.get("route") == "/v1/banks/{bank}/retrieve" for label in labels)  # the traffic was counted
    assert not [label for label in labels if {"bank", "tenant"} & set(label)]
    names = set(banks) | set(keys)
    assert not [label for label in labels if names & set(label.values())]
