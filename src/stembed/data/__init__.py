"""Training data: scenes from a :class:`~stembed.config.DataConfig`, patch sampling, torch datasets."""
