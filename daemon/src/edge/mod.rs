//! The daemon's network edge: how connections are accepted and held (timeouts, a cap,
//! per-source rate limits) and, for the admin listener, TLS.

pub mod tls;
