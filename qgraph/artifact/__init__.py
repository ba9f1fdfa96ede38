"""The artifact directory: its manifest, the weights stored once, atomic writes."""
