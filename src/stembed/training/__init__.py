"""Two-stage training with Lightning: per-sensor autoencoders, then fusion layers on frozen autoencoders."""
