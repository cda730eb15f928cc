"""The HTTP ingress deployment: routes (``deployment``), one data plane (``dataplane``), protocol adapters
(``protocols``), middleware and the error mapping to HTTP (``http_errors``)."""
