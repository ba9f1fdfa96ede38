"""The graph and its files: the graph core, its files and structure (the only onnx-graphsurgeon users), validation, the IO contract, inspection."""
