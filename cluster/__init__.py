"""raymerge.cluster: Ray execution of the engine's tensor tasks (see DESIGN.md, contract 8)."""
