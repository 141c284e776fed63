"""Training data: datasets that yield (x0, cond) batches (analytic mixtures, 2-D toys, sklearn digits)."""
