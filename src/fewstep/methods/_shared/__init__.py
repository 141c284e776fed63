"""Machinery shared by several methods (kept out of the one-loss-per-file method modules)."""
