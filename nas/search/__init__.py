"""The search side: study specs and spaces, samplers and pruners, storages and leases, the
objective and the worker loop (no torch at module level: a trial imports nas.training to train)."""
