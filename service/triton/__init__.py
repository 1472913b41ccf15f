"""Triton Inference Server: the model repository (`export`), the bundled server (`launcher`) and the
`associative_memory` model's request handling (`associative_memory`)."""
