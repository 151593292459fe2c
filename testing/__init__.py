"""Real parts for tests and benchmarks: a cloud serve process on loopback with TLS, tiny random models of each architecture, proxies that play a hostile hop or server."""
