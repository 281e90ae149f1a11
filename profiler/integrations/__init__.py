"""vramlab inside other tools: the pytest plugin and the transformers Trainer callback."""
