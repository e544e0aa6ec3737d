"""The model deployment and its clients: ``deployment`` (``ModelDeployment``, Serve name ``VTPReplica``: one
``VTPReplica`` per Serve replica behind a batch queue), ``batching`` (its admission gate), ``protocol`` (what the
ingress and the replicas exchange), ``selection`` (the served models by name, called with bounded waiting) and
``health`` (readiness from Serve's status and Ray's placement verdicts). Importing it imports no torch."""
