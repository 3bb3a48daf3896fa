"""The agent's tools: one self-contained class per file, each with a real-model and an offline backend."""
