"""llmopt: take a portfolio of LLMs to low-bit, hardware-specific deployment and measure how fast they run.

The library behind the Snakemake workflow (``Snakefile``) and the ``llmopt`` command line.
"""

__version__ = "0.1.0"
