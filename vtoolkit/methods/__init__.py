"""One file per method; each reads like the paper's algorithm section. Imported lazily by the registry."""
