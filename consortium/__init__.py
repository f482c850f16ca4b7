"""Consortium: one GGUF model split by layers across machines that do not fully trust each other.

This package is the shared core that both the operator and the node agent import: resource models,
commitments and receipts, the wire protocol, sampling, model resolution and the user's CLI. Neither
the operator (consortium_operator) nor the node agent (node_agent) imports the other.
"""

__version__ = "0.1.0"
