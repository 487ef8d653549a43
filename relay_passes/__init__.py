"""Relax graph passes (TVM removed Relay in 0.20; the folder keeps the name users know)."""
