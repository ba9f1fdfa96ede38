"""The graph and its files: the graph core (the only onnx-graphsurgeon user), validation, the IO contract, inspection."""
