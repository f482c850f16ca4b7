"""The Consortium operator (kopf), installed as `consortium_operator`.

One concern per module:
  main        the `consortium-operator` command: kopf standalone, kubeconfig or in-cluster, namespaces
  placement   stages -> approved, Ready, non-quarantined ComputeNodes; StageAssignments
  sessions    the session driver as a kopf daemon per InferenceSession, progress kept in status
  receipts    Receipt objects from the agents' signed windows
  audits      verdicts into Receipt status, node records and quarantine on ComputeNodes
  failover    the Kubernetes side of the driver's policy seam: backups, verifiers, Leases, Events
"""
