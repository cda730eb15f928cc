"""Protocol adapters: each turns its protocol's bodies into data-plane calls and shapes the answers.

* ``native``: the seed's API (``/predict``, ``/models``);
* ``v2``: the Open Inference Protocol (KServe v2) over REST;
* ``v2_grpc``: the same protocol over gRPC (``inference.GRPCInferenceService``).
"""
