"""htcli: train and use long-context H-Transformer-1D language models cheaply."""

__version__ = "0.1.0"
