"""Integrations with other libraries (optional extras): ``fewstep.integrations.diffusers``."""
