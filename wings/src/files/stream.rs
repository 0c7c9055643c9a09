//! Streaming bodies (uploads, writes, pulls) into a file on a blocking thread.

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{FsError, FsFile, FsResult, ServerFs};

/// Feeds chunks to a blocking thread that writes them through `file` (so every chunk is
/// counted against the quota). Dropping the sender ends the stream; the handle yields the
/// bytes written, or the first error (after which the writer stops reading).
pub fn spawn_writer(file: FsFile) -> (mpsc::Sender<Bytes>, tokio::task::JoinHandle<FsResult<u64>>) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(16);
    let handle = tokio::task::spawn_blocking(move || {
        let mut offset = 0u64;
        while let Some(chunk) = rx.blocking_recv() {
            file.write_all_at(&chunk, offset)?;
            offset += chunk.len() as u64;
        }
        file.sync_all()?;
        Ok(offset)
    });
    (tx, handle)
}

/// A name for a temporary file next to `target`, hidden and unique, for writes that must
/// replace the target only once complete.
pub fn temp_sibling(target: &str, tag: &str) -> FsResult<String> {
    let clean = super::clean_path(target)?;
    let (parent, name) = super::split_parent(clean)?;
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let tmp = format!(
        ".{}.mamba-{tag}-{}",
        name.chars().take(100).collect::<String>(),
        &nonce[..12]
    );
    Ok(super::join(parent, &tmp))
}

/// Moves a finished temporary file onto `target`; on failure the temporary file is removed.
pub fn commit_temp(fs: &ServerFs, tmp: &str, target: &str, replace: bool) -> FsResult<()> {
    match fs.rename(tmp, target, replace) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = fs.remove_file(tmp);
            Err(e)
        }
    }
}

/// Turns a writer task's join error into an `FsError`.
pub fn joined(result: Result<FsResult<u64>, tokio::task::JoinError>, path: &str) -> FsResult<u64> {
    result.map_err(|e| FsError::Io {
        path: path.into(),
        source: std::io::Error::other(e.to_string()),
    })?
}
