"""The model deployment (``ModelDeployment``, Serve name ``VTPReplica``: one ``VTPReplica`` per Serve replica
behind a batch queue) and what the ingress needs to call it: the protocol, model selection, readiness. Importing it
imports no torch."""
