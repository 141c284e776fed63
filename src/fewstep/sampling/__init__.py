"""Sampling: ODE integrators, flow-map multi-step samplers and log-density tracking along ODEs and jumps."""
