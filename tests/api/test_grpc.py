"""The same operations over a real gRPC channel, plus grpc.health.v1 and server reflection."""

from __future__ import annotations

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.api.pb import amserve_pb2 as pb


def vectors(rows) -> list[pb.Vector]:
    return [pb.Vector(values=list(map(float, row))) for row in rows]


def params(**values) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def expect_error(call, code: grpc.StatusCode, field: str | None = None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    if field is not None:
        assert info.value.details().startswith(field), info.value.details()
    return info.value


def test_bank_lifecycle_and_retrieve(stub, bank_name):
    info = stub.CreateBank(pb.CreateBankRequest(bank=bank_name, kind="modern", dim=4, params=params(beta=8.0)))
    assert (info.name, info.kind, info.dim, info.count) == (bank_name, "modern", 4, 0)
    assert dict(info.params) == {"beta": 8.0}
    expect_error(lambda: stub.CreateBank(pb.CreateBankRequest(bank=bank_name, kind="modern", dim=4)),
                 grpc.StatusCode.ALREADY_EXISTS)
    stored = stub.Store(pb.StoreRequest(bank=bank_name, patterns=vectors([[1, 0, 0, 0], [0, 1, 0, 0]]), ids=["a", "b"]))
    assert list(stored.ids) == ["a", "b"] and stored.count == 2 and stored.version == 1
    assert bank_name in [b.name for b in stub.ListBanks(pb.ListBanksRequest()).banks]
    info = stub.GetBank(pb.GetBankRequest(bank=bank_name))
    assert (info.count, info.version, len(info.checksum)) == (2, 1, 16)

    response = stub.Retrieve(pb.RetrieveRequest(bank=bank_name, queries=vectors([[0.9, 0.2, 0, 0]]), trace=True, steps=5,
                                                min_version=stored.version))
    result = response.results[0]
    assert result.nearest.id == "a" and result.converged
    assert result.state[0] > 0.99 and len(result.trace) == result.steps + 1

    completed = stub.Complete(pb.CompleteRequest(bank=bank_name, queries=vectors([[0.5, 0.0, 0, 0]]),
                                                 mask=[pb.Mask(values=[True, False, False, False])]))
    assert completed.results[0].state[0] == pytest.approx(0.5)

    assert stub.DeletePattern(pb.DeletePatternRequest(bank=bank_name, id="a")).version == 2
    expect_error(lambda: stub.Retrieve(pb.RetrieveRequest(bank=bank_name, queries=vectors([[1, 0, 0, 0]]),
                                                          min_version=9)), grpc.StatusCode.INVALID_ARGUMENT,
                 "min_version")
    expect_error(lambda: stub.DeletePattern(pb.DeletePatternRequest(bank=bank_name, id="a")), grpc.StatusCode.NOT_FOUND, "id")
    stub.DeleteBank(pb.DeleteBankRequest(bank=bank_name))
    expect_error(lambda: stub.GetBank(pb.GetBankRequest(bank=bank_name)), grpc.StatusCode.NOT_FOUND, "bank")


def test_grpc_and_rest_answer_identically(stub, client, bank_name):
    rng = np.random.default_rng(3)
    patterns = rng.standard_normal((10, 6)).astype(np.float32)
    stub.CreateBank(pb.CreateBankRequest(bank=bank_name, kind="rbf", dim=6, params=params(beta=2.0)))
    stub.Store(pb.StoreRequest(bank=bank_name, patterns=vectors(patterns), ids=[f"p{i}" for i in range(10)]))
    queries = (patterns[:3] + 0.2 * rng.standard_normal((3, 6))).astype(np.float32)
    via_grpc = stub.Retrieve(pb.RetrieveRequest(bank=bank_name, queries=vectors(queries), trace=True)).results
    via_rest = client.post(f"/v1/banks/{bank_name}/retrieve", json={"queries": queries.tolist(), "trace": True}).json()["results"]
    for g, r in zip(via_grpc, via_rest):
        np.testing.assert_array_equal(np.float32(g.state), np.float32(r["state"]))
        assert g.energy == pytest.approx(r["energy"], rel=1e-6) and g.steps == r["steps"]
        assert g.nearest.id == r["nearest"]["id"] and g.converged == r["converged"]
        np.testing.assert_allclose(list(g.trace), r["trace"], rtol=1e-6)


@pytest.mark.parametrize("request_factory, field", [
    (lambda bank: pb.RetrieveRequest(bank=bank, queries=vectors([[1, 2, 3]])), "queries"),
    (lambda bank: pb.RetrieveRequest(bank=bank, queries=[]), "queries"),
    (lambda bank: pb.RetrieveRequest(bank=bank, queries=vectors([[1, 2], [1, 2, 3, 4]])), "queries"),
    (lambda bank: pb.RetrieveRequest(bank=bank, queries=vectors([[1, 2, float("nan"), 4]])), "queries[0][2]"),
    (lambda bank: pb.RetrieveRequest(bank=bank, queries=vectors([[1, 2, 3, 4]]), steps=0), "steps"),
])
def test_invalid_arguments_name_the_field(stub, bank_name, request_factory, field):
    stub.CreateBank(pb.CreateBankRequest(bank=bank_name, kind="modern", dim=4))
    stub.Store(pb.StoreRequest(bank=bank_name, patterns=vectors([[1, 0, 0, 0]])))
    expect_error(lambda: stub.Retrieve(request_factory(bank_name)), grpc.StatusCode.INVALID_ARGUMENT, field)


def test_create_errors(stub, bank_name):
    expect_error(lambda: stub.CreateBank(pb.CreateBankRequest(bank=bank_name, kind="nope", dim=4)),
                 grpc.StatusCode.INVALID_ARGUMENT, "kind")
    expect_error(lambda: stub.CreateBank(pb.CreateBankRequest(bank="Bad Name", kind="modern", dim=4)),
                 grpc.StatusCode.INVALID_ARGUMENT, "bank")
    expect_error(lambda: stub.Retrieve(pb.RetrieveRequest(bank="missing", queries=vectors([[1]]))),
                 grpc.StatusCode.NOT_FOUND, "bank")


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "amserve.v1.Amserve"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"amserve.v1.Amserve", "grpc.health.v1.Health"} <= names


def test_grpc_requests_are_metered(server, stub, bank_name):
    stub.CreateBank(pb.CreateBankRequest(bank=bank_name, kind="modern", dim=2))
    text = httpx.get(f"{server.url}/metrics").text
    assert 'amserve_requests_total{route="CreateBank",status="OK",transport="grpc"}' in text
