"""Pieces every service shares: settings from the environment, tracing, Redis keys, errors."""
