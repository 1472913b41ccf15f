"""Triton Inference Server: the model repository (`export`), the bundled server (`launcher`), the
models' wire formats and request handling (`associative_memory`, `energy_transformer`, `llm`, shared
pieces in `wire`); the model.py files under templates/ are thin adapters around them."""
