"""The one error every converter raises (re-exported as ``converters.hf.CheckpointError``).

Its own module so that the readers ``hf`` calls into (``gguf``, the mapping tables) can raise it
without importing ``hf`` back.
"""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or converted (message names the problem)."""
