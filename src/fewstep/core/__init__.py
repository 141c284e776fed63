"""Core concepts: probability paths, the flow-map student wrapper, time samplers, JVPs and tensor helpers."""
