from tests.triton.fixtures import triton_server  # noqa: F401
