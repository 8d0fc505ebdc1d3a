"""EfficientNet training through DeepSpeed that reproduces the TF recipe."""
