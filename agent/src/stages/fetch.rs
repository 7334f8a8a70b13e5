//! Downloads a stage-2 artifact (kernel, initrd) into the host's [`WorkDir`], verifying
//! its sha256 while writing, so nothing unverified is ever handed to kexec.
//!
//! `bearman_proto::http` buffers whole responses (64 MiB cap), too small for initrds, so
//! this module streams: it sends one GET through the same [`Connector`], follows no
//! redirects, requires a `Content-Length`, writes to `<name>.part` and renames it only once
//! the size and checksum match.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bearman_proto::http::HttpUrl;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::Connector;
use crate::host::WorkDir;

/// Largest artifact accepted: a stage-2 initrd with a whole OS in it stays below.
pub const ARTIFACT_BYTES_MAX: u64 = 2 * 1024 * 1024 * 1024;
/// Bound on one whole download.
pub const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Bound on one read: a stalled server fails fast instead of waiting out the whole budget.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
const HEADER_BYTES_MAX: usize = 64 * 1024;
/// Room made for each read of an artifact body.
const BODY_READ_BYTES: usize = 64 * 1024;

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub bytes_max: u64,
    pub total: Duration,
    pub read: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            bytes_max: ARTIFACT_BYTES_MAX,
            total: DOWNLOAD_TIMEOUT,
            read: READ_TIMEOUT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("{url}: not a plain http url")]
    Url { url: String },
    #[error("{url}: cannot connect: {source}")]
    Connect { url: String, source: std::io::Error },
    #[error("{url}: {source}")]
    Io { url: String, source: std::io::Error },
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: redirect to {location} refused (artifact urls must be direct)")]
    Redirect { url: String, location: String },
    #[error("{url}: malformed response: {detail}")]
    Malformed { url: String, detail: String },
    #[error("{url}: {size} bytes exceeds the {max}-byte limit")]
    TooLarge { url: String, size: u64, max: u64 },
    #[error("{url}: connection closed after {received} of {expected} bytes")]
    Truncated {
        url: String,
        received: u64,
        expected: u64,
    },
    #[error("{url}: no data within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("{url}: sha256 mismatch: expected {expected}, got {actual}")]
    Checksum {
        url: String,
        expected: String,
        actual: String,
    },
}

/// Downloads `url` to `name` in `dir`, checking its sha256 against `sha256` (lowercase
/// hex). On any error the partial file is removed and `name` is left as it was.
pub async fn download<C: Connector, W: WorkDir>(
    connector: &C,
    url: &str,
    sha256: &str,
    dir: &W,
    name: &str,
    limits: Limits,
) -> Result<PathBuf, DownloadError> {
    let final_path = dir.path().join(name);
    let part_path = dir.path().join(format!("{name}.part"));
    let result = match tokio::time::timeout(
        limits.total,
        fetch(connector, url, sha256, dir, &part_path, limits),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(DownloadError::Timeout {
            url: url.to_string(),
            timeout: limits.total,
        }),
    };
    if let Err(error) = result {
        let _ = dir.remove(&part_path).await;
        return Err(error);
    }
    dir.rename(&part_path, &final_path)
        .await
        .map_err(|source| DownloadError::File {
            path: final_path.clone(),
            source,
        })?;
    Ok(final_path)
}

async fn fetch<C: Connector, W: WorkDir>(
    connector: &C,
    url: &str,
    sha256: &str,
    dir: &W,
    part_path: &Path,
    limits: Limits,
) -> Result<(), DownloadError> {
    let parsed = HttpUrl::parse(url).map_err(|_| DownloadError::Url {
        url: url.to_string(),
    })?;
    let authority = parsed.authority();
    let io = |source| DownloadError::Io {
        url: url.to_string(),
        source,
    };
    let malformed = |detail: &str| DownloadError::Malformed {
        url: url.to_string(),
        detail: detail.to_string(),
    };
    let timed_out = || DownloadError::Timeout {
        url: url.to_string(),
        timeout: limits.read,
    };
    let mut stream = tokio::time::timeout(limits.read, connector.connect(&authority))
        .await
        .map_err(|_| timed_out())?
        .map_err(|source| DownloadError::Connect {
            url: url.to_string(),
            source,
        })?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nAccept-Encoding: identity\r\n\r\n",
        parsed.path
    );
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    stream.flush().await.map_err(io)?;

    // Headers.
    // Reads go straight into spare capacity (`read_buf`): no read buffer to zero.
    let mut buffer = Vec::with_capacity(4096);
    let header_end = loop {
        if let Some(position) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break position;
        }
        if buffer.len() > HEADER_BYTES_MAX {
            return Err(malformed("headers exceed 64 KiB"));
        }
        buffer.reserve(4096);
        let read = tokio::time::timeout(limits.read, stream.read_buf(&mut buffer))
            .await
            .map_err(|_| timed_out())?
            .map_err(io)?;
        if read == 0 {
            return Err(malformed("connection closed before headers ended"));
        }
    };
    let head = std::str::from_utf8(&buffer[..header_end])
        .map_err(|_| malformed("headers are not utf-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| malformed("bad status line"))?;
    let mut content_length = None;
    let mut location = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.trim().eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<u64>()
                    .map_err(|_| malformed("bad content-length"))?,
            );
        } else if name.trim().eq_ignore_ascii_case("location") {
            location = Some(value.to_string());
        } else if name.trim().eq_ignore_ascii_case("transfer-encoding") {
            chunked = !value.eq_ignore_ascii_case("identity");
        }
    }
    if (300..400).contains(&status) {
        return Err(DownloadError::Redirect {
            url: url.to_string(),
            location: location.unwrap_or_default(),
        });
    }
    if !(200..300).contains(&status) {
        return Err(DownloadError::Status {
            url: url.to_string(),
            status,
        });
    }
    if chunked {
        return Err(malformed(
            "chunked transfer encoding is not supported for artifacts",
        ));
    }
    // Without a length a cut connection looks like a complete file; refuse it.
    let expected = content_length.ok_or_else(|| malformed("no content-length"))?;
    if expected > limits.bytes_max {
        return Err(DownloadError::TooLarge {
            url: url.to_string(),
            size: expected,
            max: limits.bytes_max,
        });
    }

    // Body, hashed as it is written.
    let mut file = dir
        .create(part_path)
        .await
        .map_err(|source| DownloadError::File {
            path: part_path.to_path_buf(),
            source,
        })?;
    let file_error = |source| DownloadError::File {
        path: part_path.to_path_buf(),
        source,
    };
    let mut hasher = Sha256::new();
    let mut received: u64 = 0;
    let mut pending = buffer.split_off(header_end + 4);
    loop {
        let room = usize::try_from(expected - received).unwrap_or(usize::MAX);
        pending.truncate(room);
        if !pending.is_empty() {
            hasher.update(&pending);
            file.write_all(&pending).await.map_err(file_error)?;
            received += pending.len() as u64;
        }
        if received >= expected {
            break;
        }
        pending.clear();
        pending.reserve(BODY_READ_BYTES);
        let read = tokio::time::timeout(limits.read, stream.read_buf(&mut pending))
            .await
            .map_err(|_| timed_out())?
            .map_err(io)?;
        if read == 0 {
            return Err(DownloadError::Truncated {
                url: url.to_string(),
                received,
                expected,
            });
        }
    }
    file.flush().await.map_err(file_error)?;
    dir.sync(&mut file).await.map_err(file_error)?;
    let actual = hex::encode(hasher.finalize());
    if actual != sha256 {
        return Err(DownloadError::Checksum {
            url: url.to_string(),
            expected: sha256.to_string(),
            actual,
        });
    }
    Ok(())
}
