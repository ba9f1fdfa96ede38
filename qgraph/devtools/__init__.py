"""Support code of the developer tools: the pass debugger, the benchmark, the perplexity measure, golden-graph files."""
