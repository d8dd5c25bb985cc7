"""raypatch: patch-level training of causal language models on Ray (Shao et al., ICLR 2025)."""

__version__ = "0.1.0"
