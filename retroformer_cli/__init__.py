"""retroformer: make LLM agents learn from their own failures.

The public Python API lives in the stage modules (``retroformer_cli.stages.collect.run`` ...).
This module imports nothing heavy so that ``retroformer --help`` stays fast.
"""

__version__ = "0.1.0"
