"""Verification core shared by the operator, the session driver and the node agent.

Modules, imported as namespaces (``from consortium.verification import canonical``):
- canonical: canonical-grid commitments of stage outputs, one per token row;
- merkle: Merkle roots over a window's commitments, inclusion proofs;
- signing: Ed25519 keys and the length-prefixed byte encoding of signed statements;
- receipts: window statements, WindowSigner (agent side), Receipt and verify_receipt;
- verdicts: per-audit figures, Tolerance and the four verdicts;
- judgement: node-level binomial test, NodeRecord, false_fraud;
- proofs: FraudProof, its construction and independent re-check.

The spec of every byte is in docs/verification.md.
"""
