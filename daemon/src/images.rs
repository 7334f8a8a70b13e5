//! The image-store seam: boot artifacts (stage-1 kernel and initramfs, stage-2 images)
//! served under `/images/…`. Production reads a directory; the simulator keeps bytes in
//! memory. Flavors may also point at any outside URL (object storage), in which case the
//! daemon serves nothing for them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use async_trait::async_trait;

/// Largest artifact served; a stage-1 initramfs is tens of MiB.
pub const IMAGE_BYTES_MAX: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image path {0:?}: use [A-Za-z0-9._-] segments separated by /")]
    InvalidPath(String),
    #[error("image {0} is larger than {IMAGE_BYTES_MAX} bytes")]
    TooLarge(String),
    #[error("reading image {path}: {detail}")]
    Io { path: String, detail: String },
}

#[async_trait]
pub trait ImageStore: Send + Sync + 'static {
    /// The artifact's bytes, `None` when there is no such artifact.
    async fn get(&self, path: &str) -> Result<Option<Vec<u8>>, ImageError>;
}

/// Paths are relative, with plain segments only: no `..`, no hidden files, no absolute paths.
pub fn check_path(path: &str) -> Result<(), ImageError> {
    let ok = !path.is_empty()
        && path.len() <= 512
        && path.split('/').all(|segment| {
            !segment.is_empty()
                && !segment.starts_with('.')
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        });
    if ok {
        Ok(())
    } else {
        Err(ImageError::InvalidPath(path.chars().take(80).collect()))
    }
}

/// Serves `<data-dir>/images/…`.
pub struct DirImages {
    root: PathBuf,
}

impl DirImages {
    pub fn new(root: PathBuf) -> Self {
        DirImages { root }
    }
}

#[async_trait]
impl ImageStore for DirImages {
    async fn get(&self, path: &str) -> Result<Option<Vec<u8>>, ImageError> {
        check_path(path)?;
        let full = self.root.join(path);
        let io_error = |error: std::io::Error| ImageError::Io {
            path: path.to_string(),
            detail: error.to_string(),
        };
        let metadata = match tokio::fs::metadata(&full).await {
            Ok(metadata) => metadata,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(io_error(error)),
        };
        if !metadata.is_file() {
            return Ok(None);
        }
        if metadata.len() > IMAGE_BYTES_MAX {
            return Err(ImageError::TooLarge(path.to_string()));
        }
        tokio::fs::read(&full).await.map(Some).map_err(io_error)
    }
}

/// Images held in memory (simulator, tests).
#[derive(Default)]
pub struct MemoryImages {
    images: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl MemoryImages {
    pub fn insert(&self, path: &str, bytes: Vec<u8>) {
        self.images
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.to_string(), bytes);
    }
}

#[async_trait]
impl ImageStore for MemoryImages {
    async fn get(&self, path: &str) -> Result<Option<Vec<u8>>, ImageError> {
        check_path(path)?;
        Ok(self
            .images
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(path)
            .cloned())
    }
}
