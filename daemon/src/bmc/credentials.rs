//! BMC credentials: resolving a node's `credentials_ref` (`env:VARIABLE` or `file:KEY`) to a
//! username and a [`Secret`] password.
//!
//! Architecture invariant: a password is only ever held in a [`Secret`], whose `Debug` and
//! `Display` print `***`; no error built here quotes a password or a line of the secrets
//! file (a TOML parse error would quote the line, so only its position is reported).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::core::secret::Secret;

/// What a BMC is logged into with.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("credentials reference {reference:?} is neither env:VARIABLE nor file:KEY")]
    BadReference { reference: String },
    #[error("no credentials reference configured for this BMC (set it with `bearman node update --bmc-credentials-ref env:VARIABLE|file:KEY`)")]
    Missing,
    #[error("environment variable {variable} (credentials reference env:{variable}) is not set")]
    EnvUnset { variable: String },
    #[error(
        "environment variable {variable} must hold username:password (with a non-empty username)"
    )]
    EnvMalformed { variable: String },
    #[error("credentials reference file:{key} needs a secrets file, and none is configured (bmc.secrets_file)")]
    NoSecretsFile { key: String },
    #[error("reading secrets file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("secrets file {path} is readable or writable by group or others (mode {mode:04o}); run `chmod 600 {path}`", path = path.display())]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("secrets file {path} is not valid: {reason}", path = path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("secrets file {path} has no [{key}] table", path = path.display())]
    UnknownKey { path: PathBuf, key: String },
}

/// Where `file:KEY` references are looked up, and how `env:VARIABLE` ones are read.
#[derive(Clone, Debug, Default)]
pub struct CredentialSource {
    /// A TOML file of `[KEY]` tables, each with `username` and `password`; mode 0600.
    pub secrets_file: Option<PathBuf>,
}

impl CredentialSource {
    pub fn new(secrets_file: Option<PathBuf>) -> CredentialSource {
        CredentialSource { secrets_file }
    }

    /// Resolves `reference` against the process environment and the secrets file.
    pub fn resolve(&self, reference: Option<&str>) -> Result<Credentials, CredentialError> {
        self.resolve_with(reference, |name| std::env::var(name).ok())
    }

    /// As [`CredentialSource::resolve`], reading environment variables through `env`.
    pub fn resolve_with(
        &self,
        reference: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Credentials, CredentialError> {
        let reference = reference.map(str::trim).unwrap_or("");
        if reference.is_empty() {
            return Err(CredentialError::Missing);
        }
        let bad = || CredentialError::BadReference {
            reference: reference.to_string(),
        };
        if let Some(variable) = reference.strip_prefix("env:") {
            if variable.is_empty() || variable.contains(['=', '\0']) {
                return Err(bad());
            }
            let value = env(variable).ok_or_else(|| CredentialError::EnvUnset {
                variable: variable.to_string(),
            })?;
            // Usernames hold no colon; passwords may.
            return match value.split_once(':') {
                Some((username, password)) if !username.is_empty() => Ok(Credentials {
                    username: username.to_string(),
                    password: Secret::new(password),
                }),
                _ => Err(CredentialError::EnvMalformed {
                    variable: variable.to_string(),
                }),
            };
        }
        if let Some(key) = reference.strip_prefix("file:") {
            if key.is_empty() {
                return Err(bad());
            }
            let path =
                self.secrets_file
                    .as_deref()
                    .ok_or_else(|| CredentialError::NoSecretsFile {
                        key: key.to_string(),
                    })?;
            let mut entries = read_secrets_file(path)?;
            return entries
                .remove(key)
                .ok_or_else(|| CredentialError::UnknownKey {
                    path: path.to_path_buf(),
                    key: key.to_string(),
                });
        }
        Err(bad())
    }
}

/// Secrets files are small; anything larger is a mistake, not a secrets file.
const SECRETS_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// Reads and checks the secrets file: private to its owner, valid TOML, every table a
/// username and a password.
pub fn read_secrets_file(path: &Path) -> Result<BTreeMap<String, Credentials>, CredentialError> {
    let read_error = |error: std::io::Error| CredentialError::Read {
        path: path.to_path_buf(),
        reason: error.to_string(),
    };
    let metadata = std::fs::metadata(path).map_err(read_error)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = metadata.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(CredentialError::TooOpen {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    if metadata.len() > SECRETS_FILE_BYTES_MAX {
        return Err(CredentialError::Invalid {
            path: path.to_path_buf(),
            reason: format!("larger than {SECRETS_FILE_BYTES_MAX} bytes"),
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_error)?;
    let entries: BTreeMap<String, Credentials> = toml::from_str(&text).map_err(|error| {
        // The parser's own message can quote the offending line or value — possibly a
        // password — so only say where.
        let line = error
            .span()
            .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
        CredentialError::Invalid {
            path: path.to_path_buf(),
            reason: match line {
                Some(line) => format!(
                    "near line {line}: expected [KEY] tables holding only username = \"...\" and password = \"...\""
                ),
                None => "expected [KEY] tables holding only username = \"...\" and password = \"...\"".to_string(),
            },
        }
    })?;
    if let Some((key, _)) = entries.iter().find(|(_, c)| c.username.is_empty()) {
        return Err(CredentialError::Invalid {
            path: path.to_path_buf(),
            reason: format!("[{key}] has an empty username"),
        });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_prints_stars_in_every_format() {
        let credentials = Credentials {
            username: "admin".into(),
            password: Secret::new("hunter2-very-secret"),
        };
        for text in [
            format!("{credentials:?}"),
            format!("{credentials:#?}"),
            format!("{}", credentials.password),
            format!("{:?}", credentials.password),
        ] {
            assert!(!text.contains("hunter2"), "{text}");
        }
        assert!(format!("{credentials:?}").contains("***"));
        assert_eq!(
            credentials.password.redact("bad pw hunter2-very-secret!"),
            "bad pw ***!"
        );
    }

    #[test]
    fn env_reference_splits_at_the_first_colon() {
        let source = CredentialSource::default();
        let credentials = source
            .resolve_with(Some("env:BMC_CN1"), |name| {
                (name == "BMC_CN1").then(|| "admin:pa:ss".to_string())
            })
            .unwrap();
        assert_eq!(credentials.username, "admin");
        assert_eq!(credentials.password.expose(), "pa:ss");
    }

    #[test]
    fn malformed_env_value_is_refused_without_quoting_it() {
        let source = CredentialSource::default();
        let error = source
            .resolve_with(Some("env:BMC_CN1"), |_| Some("only-a-password".into()))
            .unwrap_err();
        let text = error.to_string();
        assert!(text.contains("username:password"), "{text}");
        assert!(!text.contains("only-a-password"), "{text}");
    }

    #[test]
    fn references_must_name_a_source() {
        let source = CredentialSource::default();
        for reference in ["admin:password", "env:", "file:", "vault:x"] {
            let error = source.resolve_with(Some(reference), |_| None).unwrap_err();
            assert!(
                matches!(error, CredentialError::BadReference { .. }),
                "{reference}: {error}"
            );
        }
        assert!(matches!(
            source.resolve_with(None, |_| None),
            Err(CredentialError::Missing)
        ));
        assert!(matches!(
            source.resolve_with(Some("file:rack1"), |_| None),
            Err(CredentialError::NoSecretsFile { .. })
        ));
    }
}
