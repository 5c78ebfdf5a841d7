"""Data: document readers, the tokenized corpus format, the default corpus, Megatron readers."""
