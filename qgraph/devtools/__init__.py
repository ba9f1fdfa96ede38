"""Support code of the developer tools: the pass debugger, the benchmark, golden-graph files."""
