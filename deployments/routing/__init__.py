"""Request routing for the model workers: the placement policy (``policy``, pure), the router Serve runs in
each caller (``router``), and the callers' view of the worker replicas (``views``)."""
