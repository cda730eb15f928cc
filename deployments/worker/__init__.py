"""The model-worker deployment."""
