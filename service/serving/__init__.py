"""The loops above the model math: the dynamic micro-batcher and the LM continuous-batching scheduler."""
