"""Model families: config dataclass + nn.Modules + weight-name table, one module each."""
