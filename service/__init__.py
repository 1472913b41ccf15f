"""amserve: associative memories, the Energy Transformer and decoder LMs behind REST and gRPC."""

__version__ = "0.1.0"
