"""vramlab profiler: measured memory (tracker, harness, CLI)."""
