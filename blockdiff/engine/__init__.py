"""The fast engine: continuous batching of block-diffusion requests on one device."""
