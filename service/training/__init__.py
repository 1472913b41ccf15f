"""Training scripts whose small outputs ship in model_repository."""
