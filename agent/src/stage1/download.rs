//! The download directory on a real machine (a tmpfs, `/run/bearman`): [`FsWorkDir`]
//! writes, syncs, renames and removes files with tokio's file system calls. The verified
//! download itself is [`crate::stages::fetch`]'s.

use std::io;
use std::path::{Path, PathBuf};

use crate::client::Connector;
use crate::host::WorkDir;

pub use crate::stages::fetch::{
    DownloadError, Limits, ARTIFACT_BYTES_MAX, DOWNLOAD_TIMEOUT, READ_TIMEOUT,
};

/// A directory on the machine's file system.
#[derive(Clone, Debug)]
pub struct FsWorkDir {
    pub dir: PathBuf,
}

impl WorkDir for FsWorkDir {
    type File = tokio::fs::File;

    fn path(&self) -> &Path {
        &self.dir
    }

    async fn create_dir_all(&self) -> io::Result<()> {
        tokio::fs::create_dir_all(&self.dir).await
    }

    async fn create(&self, path: &Path) -> io::Result<tokio::fs::File> {
        tokio::fs::File::create(path).await
    }

    async fn sync(&self, file: &mut tokio::fs::File) -> io::Result<()> {
        file.sync_all().await
    }

    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        tokio::fs::rename(from, to).await
    }

    async fn remove(&self, path: &Path) -> io::Result<()> {
        tokio::fs::remove_file(path).await
    }
}

/// Downloads `url` to `dir/name` on the file system, checking its sha256 against `sha256`
/// (lowercase hex). On any error the partial file is removed and `dir/name` is left as
/// it was.
pub async fn download<C: Connector>(
    connector: &C,
    url: &str,
    sha256: &str,
    dir: &Path,
    name: &str,
    limits: Limits,
) -> Result<PathBuf, DownloadError> {
    let dir = FsWorkDir {
        dir: dir.to_path_buf(),
    };
    crate::stages::fetch::download(connector, url, sha256, &dir, name, limits).await
}
