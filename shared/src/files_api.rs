//! Requests and answers of wings' file manager API (`/api/servers/{id}/files/...`) and its
//! signed-URL routes (`/download/file`, `/upload/file`, `/download/backup`).
//!
//! Paths are relative to the server's root folder, `/`-separated; `""` or `"."` is the root.

use serde::{Deserialize, Serialize};

/// What a folder entry is. Symlinks are reported, never followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    File,
    Directory,
    Symlink,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits as a number (`420` = `0o644`).
    pub mode: u32,
    /// The same bits as an octal string (`"644"`).
    pub mode_octal: String,
    /// Last modification, Unix seconds.
    pub modified: i64,
    /// Where a symlink points, as written in the link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

/// `GET list?directory=&page=&per_page=`: folders first, then by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListResponse {
    pub directory: String,
    /// Entries in the whole folder.
    pub total: usize,
    /// 1-based.
    pub page: usize,
    pub per_page: usize,
    pub entries: Vec<FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenamePair {
    pub from: String,
    pub to: String,
}

/// `POST rename`: each pair is relative to `root`; an existing target is never replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenameRequest {
    #[serde(default)]
    pub root: String,
    pub files: Vec<RenamePair>,
}

/// `POST copy`: copies a regular file; without `to`, next to it as "name copy.ext".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyRequest {
    pub file: String,
    #[serde(default)]
    pub to: Option<String>,
}

/// The path a copy, compress or pull created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedResponse {
    pub file: String,
    pub size: u64,
}

/// `POST delete`: files and folders (recursively) relative to `root`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteRequest {
    #[serde(default)]
    pub root: String,
    pub files: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteResponse {
    pub deleted: usize,
    pub freed_bytes: u64,
}

/// `POST create-directory`: makes `root/name` (and missing parents); an existing one is 409.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateDirectoryRequest {
    #[serde(default)]
    pub root: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChmodFile {
    pub file: String,
    /// Octal permission bits, at most `"777"`.
    pub mode: String,
}

/// `POST chmod`: never through a symlink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChmodRequest {
    #[serde(default)]
    pub root: String,
    pub files: Vec<ChmodFile>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArchiveFormat {
    #[serde(rename = "zip")]
    Zip,
    #[serde(rename = "tar.gz")]
    TarGz,
    #[serde(rename = "tar.zst")]
    TarZst,
}

impl ArchiveFormat {
    pub fn extension(self) -> &'static str {
        match self {
            ArchiveFormat::Zip => "zip",
            ArchiveFormat::TarGz => "tar.gz",
            ArchiveFormat::TarZst => "tar.zst",
        }
    }
}

/// `POST compress`: packs `files` (relative to `root`) into a new archive in `root`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressRequest {
    #[serde(default)]
    pub root: String,
    pub files: Vec<String>,
    #[serde(default = "default_format")]
    pub format: ArchiveFormat,
    /// The archive's file name (in `root`); default `archive-<unix time>.<ext>`.
    #[serde(default)]
    pub name: Option<String>,
}

fn default_format() -> ArchiveFormat {
    ArchiveFormat::TarGz
}

/// `POST decompress`: unpacks `root/file` (zip, tar, tar.gz or tar.zst) into `root`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecompressRequest {
    #[serde(default)]
    pub root: String,
    pub file: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecompressResponse {
    pub entries: u64,
    pub bytes_written: u64,
}

/// `POST pull`: downloads `url` into `directory`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullRequest {
    pub url: String,
    #[serde(default)]
    pub directory: String,
    /// The file name; default the last segment of the URL's path.
    #[serde(default)]
    pub file_name: Option<String>,
    /// Answer only when the download has finished (or failed).
    #[serde(default)]
    pub foreground: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullView {
    pub id: String,
    pub url: String,
    pub file: String,
    pub bytes: u64,
    /// From `Content-Length`, when the server sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// Unix seconds.
    pub started_at: u64,
}

/// One `GET search` hit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchHit {
    pub path: String,
    pub kind: FileKind,
    pub size: u64,
    pub modified: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchResponse {
    pub hits: Vec<SearchHit>,
    /// Whether the search stopped at its result or entry limit.
    pub truncated: bool,
}

/// The scopes of signed-URL tokens; each route accepts exactly one.
pub const SCOPE_FILE_DOWNLOAD: &str = "file-download";
pub const SCOPE_FILE_UPLOAD: &str = "file-upload";
pub const SCOPE_BACKUP_DOWNLOAD: &str = "backup-download";

/// What the panel signs (EdDSA, the console token key) into a signed-URL token (`?token=`).
/// Scoped to one purpose, one server and one file (or backup), short-lived, used once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedUrlClaims {
    /// The user's id.
    pub sub: String,
    pub server: String,
    pub scope: String,
    /// The file to download, or the file an upload writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The backup to download.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    pub iat: u64,
    pub exp: u64,
    /// Unique per token: a used `jti` is refused until the token expires.
    pub jti: String,
}
