"""Run configuration: typed YAML configs (schema), strict dict <-> dataclass conversion, and building runs."""
