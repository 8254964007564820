//! Test-only DNS servers (UDP, TCP, TLS) for the upstream unit tests.
