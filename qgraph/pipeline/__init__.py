"""Passes in order: the pass protocol and manager, the facts passes declare, the registry, the declared pipeline (stages), the options, and optimize()."""
