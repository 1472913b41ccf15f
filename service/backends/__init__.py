"""Backends answer the public operations: in-process engines (embedded) or a Triton server (triton)."""
