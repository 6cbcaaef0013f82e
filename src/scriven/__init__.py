"""scriven: train, evaluate, inspect and serve small generative text models on your own text."""

__version__ = "0.1.0"
