"""The registry check: a one-replica deployment that makes Serve report a refused registry change."""
