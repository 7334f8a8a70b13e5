//! TLS for the admin listener: certificate and key from files, reloaded on SIGHUP.
