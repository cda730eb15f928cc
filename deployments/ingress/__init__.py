"""The ingress deployment (HTTP and gRPC): routes (``deployment``), one data plane (``dataplane``), protocol adapters
(``protocols``), middleware and the error mapping to HTTP (``http_errors``)."""
