//! Upstream resolvers: udp://, tcp:// and tls:// (DoT) transports, pooling, failover and health.
