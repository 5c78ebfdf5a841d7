"""Dictionary learning: sparse autoencoders and transcoders on any hook at any checkpoint."""
