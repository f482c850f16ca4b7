"""The session driver: runs one session through node agents over gRPC, without Kubernetes.

client   one gRPC connection per node, with per-RPC timings and payload bytes
state    the session's progress as a plain serializable object (tokens, per-stage epochs and nodes,
         batch shapes, audit results), so a driver can be saved and resumed
policy   the seam: which node takes over a stage and which node verifies (local policy here; the
         operator fills it from Kubernetes)
session  the driver itself: the stage hops of each token step, failover, audits, receipts, rollback
proofs   signed fraud proofs of the audits' Fraud verdicts, each once its worker's window is a receipt
"""
