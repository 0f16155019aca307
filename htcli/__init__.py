"""htcli: train and use long-context H-Transformer-1D language models cheaply."""

import warnings

__version__ = "0.1.0"

# torch warns at import when NumPy is absent; only saving checkpoints (safetensors) needs it
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
