"""Model files: what a Qwen2 checkpoint holds (weights.py, config.py), reading it in place
(checkpoint.py: safetensors or GGUF), GGUF metadata and the built-in models (gguf_metadata.py,
builtins.py, files.py, cache.py), and its tokenizer and chat template (chat_format.py). Used by the engine to load, and by the client to fetch a model
once before the ranks load it. Nothing here loads the native engine.
"""
