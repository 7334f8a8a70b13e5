//! What the HTTPS clients of outside systems (Redfish BMCs, Keystone/Nova) share: trusting
//! exactly the CAs of a configured file, and errors told with their causes.

use std::path::Path;

/// `builder` trusting only the CA certificates in the PEM bundle at `path` (not the
/// built-in public roots: a private BMC or cloud CA is the only one that should vouch).
/// The error says what is wrong with the file.
pub fn trust_only_ca_file(
    builder: reqwest::ClientBuilder,
    path: &Path,
) -> Result<reqwest::ClientBuilder, String> {
    let pem = std::fs::read(path).map_err(|error| error.to_string())?;
    let certificates =
        reqwest::Certificate::from_pem_bundle(&pem).map_err(|error| error_chain(&error))?;
    if certificates.is_empty() {
        return Err("no pem certificate in the file".into());
    }
    Ok(certificates.into_iter().fold(
        builder.tls_built_in_root_certs(false),
        reqwest::ClientBuilder::add_root_certificate,
    ))
}

/// An error and its sources on one line, `: `-joined, each said once (hyper repeats
/// itself).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.iter().any(|part| part.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}
