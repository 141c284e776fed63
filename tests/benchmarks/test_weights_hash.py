"""The refactor check: the same training gives the same hash, a different one gives another."""

from fewstep.benchmarks.weights_hash import weights_hash


def test_hash_is_reproducible_and_sensitive_to_training() -> None:
    a, losses = weights_hash("flow_matching", steps=3)
    assert weights_hash("flow_matching", steps=3)[0] == a and "student/loss" in losses
    assert weights_hash("flow_matching", steps=4)[0] != a
