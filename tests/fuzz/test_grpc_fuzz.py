"""gRPC fuzz: well-typed messages with hostile values and raw malformed bytes, bounded. The server
answers every call with a client-error status (never INTERNAL/UNKNOWN for a parsed message) and stays
healthy."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.api.pb import amserve_pb2 as pb
from service.api.pb import amserve_pb2_grpc as pb_grpc

SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
vectors = st.lists(st.builds(pb.Vector, values=st.lists(floats, max_size=6)), max_size=4)
banks = st.one_of(st.sampled_from(["fuzz", "", "x" * 70, "../etc", "UPPER", "a/b"]), st.text(max_size=10))
int64 = st.integers(-(2**63), 2**63 - 1)
doubles = st.floats(allow_nan=True, allow_infinity=True)

messages = st.one_of(
    st.tuples(st.just("CreateBank"), st.builds(pb.CreateBankRequest, bank=banks,
                                               kind=st.sampled_from(["modern", "drdam", "dense", "", "nope"]),
                                               dim=int64)),
    st.tuples(st.just("Store"), st.builds(pb.StoreRequest, bank=banks, patterns=vectors,
                                          ids=st.lists(st.text(max_size=8), max_size=4))),
    st.tuples(st.just("Retrieve"), st.builds(pb.RetrieveRequest, bank=banks, queries=vectors, steps=int64,
                                             step_size=doubles, tolerance=doubles, trace=st.booleans())),
    st.tuples(st.just("Complete"), st.builds(pb.CompleteRequest, bank=banks, queries=vectors,
                                             mask=st.lists(st.builds(pb.Mask, values=st.lists(st.booleans(), max_size=6)),
                                                           max_size=4))),
    st.tuples(st.just("DeletePattern"), st.builds(pb.DeletePatternRequest, bank=banks, id=st.text(max_size=8))),
    st.tuples(st.just("CompleteImage"), st.builds(pb.CompleteImageRequest, model=st.sampled_from(["", "x"]),
                                                  image=vectors, steps=int64)),
)


def _prepare(channel: grpc.Channel) -> pb_grpc.AmserveStub:
    stub = pb_grpc.AmserveStub(channel)
    try:
        stub.CreateBank(pb.CreateBankRequest(bank="fuzz", kind="modern", dim=4))
        stub.Store(pb.StoreRequest(bank="fuzz", patterns=[pb.Vector(values=[1, 0, 0, 0])]))
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.ALREADY_EXISTS
    return stub


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=messages)
def test_hostile_values_get_client_errors(server, call):
    method, message = call
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = _prepare(channel)
        try:
            getattr(stub, method)(message, timeout=60)
        except grpc.RpcError as exc:
            assert exc.code() not in SERVER_FAULTS, (method, message, exc.details())


@settings(max_examples=60, deadline=None)
@given(method=st.sampled_from(["CreateBank", "Store", "Retrieve", "Complete", "GetBank", "CompleteImage"]),
       payload=st.binary(max_size=64))
def test_malformed_bytes_leave_the_server_healthy(server, method, payload):
    with grpc.insecure_channel(server.grpc_target) as channel:
        raw = channel.unary_unary(f"/amserve.v1.Amserve/{method}", request_serializer=None,
                                  response_deserializer=None)
        try:
            raw(payload, timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() != grpc.StatusCode.UNAVAILABLE
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
