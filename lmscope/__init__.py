"""lmscope: study language models through weights at every checkpoint, training data and data order."""

__version__ = "0.1.0"
