"""The input pipeline, by concern: sources.py (where images come from) and lmdb_source.py (a packed
tree), decode.py (bytes to pixels inside the first crop), transforms.py and augment.py (per image, in
the workers), loaders.py (split, sharding, batching, normalizing), batch_augment.py (random erasing
and mixup on the normalized batch, in the training process)."""
