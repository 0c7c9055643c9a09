//! The kernel primitives under [`super::ServerFs`]: resolution beneath the root handle, and
//! removal that descends by handle.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};

use super::Metadata;

/// `..` may not climb above the root, absolute paths and absolute symlinks are refused, and
/// `/proc/self/fd`-style magic links are never followed.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_MAGICLINKS);

pub(super) fn open_beneath(
    root: &OwnedFd,
    rel: &str,
    flags: OFlags,
    mode: Mode,
) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat2(root.as_fd(), rel, flags | OFlags::CLOEXEC, mode, RESOLVE)
}

/// Quota bytes held by `name` in `parent` that unlinking it frees (nothing for a file with
/// other hard links).
pub(super) fn usage_at<P: rustix::path::Arg>(parent: &OwnedFd, name: P) -> u64 {
    rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)
        .map(|st| Metadata::from_stat(&st))
        .ok()
        .filter(|m| m.is_dir() || m.nlink <= 1)
        .map_or(0, |m| m.usage)
}

/// Removes `name` in `parent`, descending into folders by handle, never by path, and never
/// following a symlink. Adds the bytes freed to `freed`.
pub(super) fn remove_at(parent: &OwnedFd, name: &CStr, freed: &mut u64) -> rustix::io::Result<()> {
    let usage = usage_at(parent, name);
    match rustix::fs::unlinkat(parent, name, AtFlags::empty()) {
        Ok(()) => {
            *freed += usage;
            return Ok(());
        }
        Err(rustix::io::Errno::ISDIR) => {}
        Err(e) => return Err(e),
    }
    let dir = rustix::fs::openat(
        parent,
        name,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    loop {
        // Re-read after each pass: removing while iterating can skip entries.
        let mut names: Vec<CString> = Vec::new();
        for item in rustix::fs::Dir::read_from(&dir)? {
            let item = item?;
            let child = item.file_name();
            if child != c"." && child != c".." {
                names.push(child.to_owned());
            }
            if names.len() >= 1024 {
                break;
            }
        }
        if names.is_empty() {
            break;
        }
        for child in names {
            match remove_at(&dir, &child, freed) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(e),
            }
        }
    }
    rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)?;
    *freed += usage;
    Ok(())
}
