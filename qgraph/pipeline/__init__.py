"""Passes in order: the pass protocol and manager, the registry, the declared pipeline, its options."""
