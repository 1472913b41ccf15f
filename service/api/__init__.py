"""Transports (REST, gRPC) over one request/response layer (schemas.py, operations.py)."""
