"""Bank state: named banks' serving state (engines in RAM or GPU) and their durable store."""
