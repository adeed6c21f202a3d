"""Training library: input pipeline, pretrained weights, optimizer, steps, metrics."""
