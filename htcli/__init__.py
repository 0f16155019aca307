"""htcli: train and use long-context H-Transformer-1D language models cheaply."""

import re

__version__ = "0.2.0"


def is_newer(version: str) -> bool:
    """Whether version (as a checkpoint or a run's config.json records it: "0.2.1", "?") names a release
    after this htcli's."""
    found = re.match(r"\d{1,9}(\.\d{1,9}){0,3}(?![\d.])", version)
    ours = [int(number) for number in re.match(r"\d+(\.\d+)*", __version__).group().split(".")]
    return found is not None and [int(number) for number in found.group().split(".")] > ours
