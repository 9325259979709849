"""The per-node daemon: the main loop (``loop``), its health endpoints (``health``), the key
rotation driver (``rotation``) and Prometheus metrics (``metrics``)."""
