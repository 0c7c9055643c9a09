#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;

use super::*;

fn root_with(limit: u64, denylist: &[&str]) -> (tempfile::TempDir, ServerFs) {
    let dir = tempfile::tempdir().unwrap();
    let uid = rustix::process::getuid().as_raw();
    let gid = rustix::process::getgid().as_raw();
    let denylist: Vec<String> = denylist.iter().map(|s| s.to_string()).collect();
    let fs = ServerFs::open_root(dir.path(), uid, gid, limit, &denylist).unwrap();
    (dir, fs)
}

fn root() -> (tempfile::TempDir, ServerFs) {
    root_with(u64::MAX / 2, &[])
}

fn escaped(r: FsResult<impl std::fmt::Debug>) -> bool {
    matches!(
        r,
        Err(FsError::Escape(_) | FsError::BadPath(_) | FsError::Symlink(_))
    )
}

#[test]
fn reads_and_writes_inside() {
    let (dir, fs) = root();
    std::fs::create_dir(dir.path().join("cfg")).unwrap();
    fs.write_file_atomic("cfg/a.txt", b"hello").unwrap();
    assert_eq!(fs.read_file("cfg/a.txt", 100).unwrap(), b"hello");
    assert!(matches!(
        fs.read_file("cfg/a.txt", 2),
        Err(FsError::TooLarge { .. })
    ));
    let (_, meta) = fs.open_read("cfg/a.txt").unwrap();
    assert_eq!(meta.size, 5);
    assert!(matches!(fs.open_read("cfg"), Err(FsError::NotAFile(_))));
}

#[test]
fn paths_are_checked_before_the_kernel_sees_them() {
    for bad in ["/etc/passwd", "../x", "a/../../x", "a/..", "a\\b", "a\0b", "/"] {
        assert!(clean_path(bad).is_err(), "{bad:?} must be refused");
    }
    assert!(clean_path(&"a".repeat(256)).is_err());
    assert!(clean_path(&"a/".repeat(3000)).is_err());
    assert_eq!(clean_path("").unwrap(), ".");
    assert_eq!(clean_path("./").unwrap(), ".");
    assert_eq!(clean_path("a/b/").unwrap(), "a/b");
}

#[test]
fn symlinks_and_dotdot_cannot_escape() {
    let (dir, fs) = root();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), "s").unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("file-link")).unwrap();
    std::os::unix::fs::symlink("../../../../../..", dir.path().join("up")).unwrap();
    assert!(escaped(fs.read_file("link/secret", 100)));
    assert!(escaped(fs.read_file("file-link", 100)));
    assert!(escaped(fs.open_read("up/etc/passwd").map(|_| ())));
    assert!(escaped(fs.stat("up")));
    assert!(escaped(fs.read_file("../x", 100)));
    assert!(escaped(fs.read_file("/etc/passwd", 100)));
    assert!(escaped(fs.write_file_atomic("link/secret", b"x")));
    assert!(escaped(fs.open("file-link", &OpenOptions::replace()).map(|_| ())));
    assert!(escaped(fs.open("link/new", &OpenOptions::replace()).map(|_| ())));
    assert!(escaped(fs.truncate("file-link", 0)));
    assert!(escaped(fs.create_dir_all("link/a/b")));
    assert!(escaped(fs.copy("file-link", "copied")));
    fs.write_file_atomic("inside", b"i").unwrap();
    assert!(escaped(fs.copy("inside", "link/copied")));
    assert!(escaped(fs.set_times(
        "link/secret",
        None,
        Some(SystemTime::UNIX_EPOCH)
    )));
    assert!(escaped(fs.list("link", 0, 10)));
    assert!(escaped(fs.walk("link").map(|_| ())));
    assert_eq!(
        std::fs::read_to_string(outside.path().join("secret")).unwrap(),
        "s"
    );
    assert!(!outside.path().join("new").exists());
    assert!(!outside.path().join("a").exists());
    // lstat and readlink describe the link itself.
    assert_eq!(fs.lstat("link").unwrap().kind, EntryKind::Symlink);
    assert_eq!(fs.read_link("link").unwrap(), outside.path().to_str().unwrap());
}

#[test]
fn symlinks_inside_the_root_are_followed_and_new_ones_must_stay_inside() {
    let (_dir, fs) = root();
    fs.create_dir_all("logs/old").unwrap();
    fs.write_file_atomic("logs/latest.log", b"line").unwrap();
    fs.symlink("logs/latest.log", "latest").unwrap();
    fs.symlink("../latest.log", "logs/old/prev").unwrap();
    assert_eq!(fs.read_file("latest", 100).unwrap(), b"line");
    assert_eq!(fs.read_file("logs/old/prev", 100).unwrap(), b"line");
    assert_eq!(fs.stat("latest").unwrap().kind, EntryKind::File);
    for (target, link) in [
        ("/etc", "abs"),
        ("..", "up"),
        ("../..", "logs/up"),
        ("a/../../..", "logs/up2"),
        ("x\\..", "bs"),
    ] {
        assert!(escaped(fs.symlink(target, link)), "{target:?} at {link:?}");
    }
}

#[test]
fn lists_pages_folders_first() {
    let (dir, fs) = root();
    fs.create_dir("world").unwrap();
    fs.write_file_atomic("world/level.dat", b"12345").unwrap();
    fs.create_dir("world/region").unwrap();
    std::os::unix::fs::symlink("level.dat", dir.path().join("world/latest")).unwrap();
    let page = fs.list("world", 0, 100).unwrap();
    let names: Vec<_> = page.entries.iter().map(|e| (e.name.as_str(), e.kind)).collect();
    assert_eq!(
        names,
        vec![
            ("region", EntryKind::Directory),
            ("latest", EntryKind::Symlink),
            ("level.dat", EntryKind::File)
        ]
    );
    assert_eq!(page.total, 3);
    assert_eq!(page.entries[1].symlink_target.as_deref(), Some("level.dat"));
    assert_eq!(page.entries[2].size, 5);
    let second = fs.list("world", 1, 1).unwrap();
    assert_eq!(second.entries.len(), 1);
    assert_eq!(second.entries[0].name, "latest");
    assert_eq!(second.total, 3);
    assert!(fs.list("world", 10, 10).unwrap().entries.is_empty());
}

#[test]
fn makes_renames_copies_chmods_and_removes_inside() {
    let (dir, fs) = root();
    fs.create_dir("world").unwrap();
    fs.write_file_atomic("world/level.dat", b"12345").unwrap();
    std::os::unix::fs::symlink("level.dat", dir.path().join("world/latest")).unwrap();

    fs.rename("world/level.dat", "level.dat", false).unwrap();
    assert!(matches!(
        fs.rename("level.dat", "world/latest", false),
        Err(FsError::Exists(_))
    ));
    fs.copy("level.dat", "copy.dat").unwrap();
    assert!(matches!(
        fs.copy("level.dat", "copy.dat"),
        Err(FsError::Exists(_))
    ));
    fs.write_file_atomic("other", b"x").unwrap();
    fs.rename("other", "copy.dat", true).unwrap();
    assert_eq!(fs.read_file("copy.dat", 10).unwrap(), b"x");

    fs.set_permissions("level.dat", 0o600).unwrap();
    assert_eq!(fs.lstat("level.dat").unwrap().mode, 0o600);
    assert!(
        fs.set_permissions("level.dat", 0o4755).is_err(),
        "setuid is never set"
    );
    fs.set_times(
        "level.dat",
        None,
        Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000)),
    )
    .unwrap();
    assert_eq!(fs.lstat("level.dat").unwrap().modified, 1000);

    fs.create_dir_all("a/b/c").unwrap();
    fs.create_dir_all("a/b/c").unwrap();
    assert!(fs.lstat("a/b/c").unwrap().is_dir());
    assert!(matches!(fs.remove_dir("a"), Err(FsError::NotEmpty(_))));
    fs.remove_dir("a/b/c").unwrap();
    assert!(matches!(fs.remove_file("a/b"), Err(FsError::IsADirectory(_))));

    fs.remove("world").unwrap();
    assert!(!dir.path().join("world").exists());
    assert!(matches!(fs.remove("world"), Err(FsError::NotFound(_))));
    assert!(escaped(fs.remove("..")));
    assert!(escaped(fs.remove(".")));
    assert!(escaped(fs.create_dir("../x")));
    assert!(escaped(fs.create_dir("a/../../x")));
}

#[test]
fn open_flags() {
    let (_dir, fs) = root();
    let create_new = OpenOptions {
        write: true,
        create: true,
        exclusive: true,
        ..OpenOptions::default()
    };
    let f = fs.open("f", &create_new).unwrap();
    f.write_all_at(b"hello world", 0).unwrap();
    assert!(matches!(fs.open("f", &create_new), Err(FsError::Exists(_))));
    let mut appender = fs
        .open(
            "f",
            &OpenOptions {
                append: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
    appender.write_all(b"!").unwrap();
    assert_eq!(fs.read_file("f", 100).unwrap(), b"hello world!");
    let f = fs.open("f", &OpenOptions::replace()).unwrap();
    assert_eq!(f.metadata().unwrap().size, 0);
    f.write_all_at(b"abc", 5).unwrap();
    let mut buf = [0u8; 8];
    let reader = fs.open("f", &OpenOptions::read()).unwrap();
    assert_eq!(reader.read_at(&mut buf, 0).unwrap(), 8);
    assert_eq!(&buf, b"\0\0\0\0\0abc");
    assert!(
        reader.write_at(b"x", 0).is_err(),
        "read-only handles do not write"
    );
    assert!(matches!(
        fs.open("missing", &OpenOptions::read()),
        Err(FsError::NotFound(_))
    ));
}

#[test]
fn the_quota_refuses_writes_that_would_pass_it_and_frees_on_delete() {
    let (_dir, fs) = root_with(1000, &[]);
    assert_eq!(fs.recount().unwrap(), 0);
    let f = fs.open("a", &OpenOptions::replace()).unwrap();
    f.write_all_at(&[1u8; 600], 0).unwrap();
    assert_eq!(fs.used_bytes(), 600);
    // Overwriting in place does not grow the file.
    f.write_all_at(&[2u8; 600], 0).unwrap();
    assert_eq!(fs.used_bytes(), 600);
    assert!(matches!(
        f.write_at(&[3u8; 401], 600),
        Err(FsError::QuotaExceeded { .. })
    ));
    assert_eq!(
        f.metadata().unwrap().size,
        600,
        "nothing of the refused write landed"
    );
    f.write_all_at(&[3u8; 400], 600).unwrap();
    assert_eq!(fs.used_bytes(), 1000);
    assert!(matches!(
        fs.write_file_atomic("b", b"x"),
        Err(FsError::QuotaExceeded { .. })
    ));
    assert!(matches!(f.set_len(1001), Err(FsError::QuotaExceeded { .. })));
    assert!(matches!(fs.copy("a", "c"), Err(FsError::QuotaExceeded { .. })));
    assert!(fs.lstat("c").is_err(), "a refused copy leaves nothing behind");
    f.set_len(500).unwrap();
    assert_eq!(fs.used_bytes(), 500);
    fs.copy("a", "c").unwrap();
    assert_eq!(fs.used_bytes(), 1000);
    fs.remove("c").unwrap();
    assert_eq!(fs.used_bytes(), 500);
    // A sparse file counts by its size, so truncate cannot hide bytes.
    assert!(matches!(
        fs.truncate("a", 10_000_000),
        Err(FsError::QuotaExceeded { .. })
    ));
    fs.create_dir_all("d/e").unwrap();
    fs.write_file_atomic("d/e/x", &[0u8; 100]).unwrap();
    let before = fs.used_bytes();
    fs.remove("d").unwrap();
    assert_eq!(fs.used_bytes(), before - 100);
    drop(f);
    // The walk agrees with the counter.
    assert_eq!(fs.recount().unwrap(), 500);
}

#[test]
fn concurrent_positional_writes_count_each_byte_of_growth_once() {
    let (_dir, fs) = root_with(1 << 30, &[]);
    let f = std::sync::Arc::new(fs.open("a", &OpenOptions::replace()).unwrap());
    let chunk = 64u64;
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let f = f.clone();
            std::thread::spawn(move || {
                for i in 0..4000u64 {
                    let block = i * 8 + w;
                    f.write_all_at(&[7u8; 64], block * chunk).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let size = f.metadata().unwrap().size;
    assert_eq!(size, 32_000 * chunk);
    assert_eq!(
        fs.used_bytes(),
        size,
        "the counter matches the file, not the sum of stale guesses"
    );
}

#[test]
fn the_walk_notices_what_was_written_from_outside_and_counts_hardlinks_once() {
    let (dir, fs) = root_with(10_000, &[]);
    fs.recount().unwrap();
    std::fs::write(dir.path().join("big"), vec![0u8; 20_000]).unwrap();
    std::fs::hard_link(dir.path().join("big"), dir.path().join("big2")).unwrap();
    assert!(!fs.over_quota(), "not yet walked");
    assert_eq!(fs.recount().unwrap(), 20_000);
    assert!(fs.over_quota());
    assert!(matches!(
        fs.write_file_atomic("x", b"1"),
        Err(FsError::QuotaExceeded { .. })
    ));
}

#[test]
fn the_first_write_counts_what_is_already_there() {
    let (dir, fs) = root_with(1000, &[]);
    std::fs::write(dir.path().join("old"), vec![0u8; 900]).unwrap();
    assert!(matches!(
        fs.write_file_atomic("new", &[0u8; 200]),
        Err(FsError::QuotaExceeded { .. })
    ));
}

#[test]
fn the_denylist_is_checked_on_the_resolved_path() {
    let (dir, fs) = root_with(u64::MAX / 2, &["server.jar", "secrets", "plugins/*.jar"]);
    std::fs::write(dir.path().join("server.jar"), "jar").unwrap();
    std::fs::create_dir_all(dir.path().join("secrets/deep")).unwrap();
    std::fs::write(dir.path().join("secrets/deep/key"), "k").unwrap();
    std::fs::create_dir(dir.path().join("plugins")).unwrap();
    std::fs::write(dir.path().join("plugins/a.jar"), "a").unwrap();
    // Links inside the root leading to denied paths.
    std::os::unix::fs::symlink("server.jar", dir.path().join("innocent")).unwrap();
    std::os::unix::fs::symlink("secrets/deep", dir.path().join("door")).unwrap();
    std::os::unix::fs::symlink("plugins", dir.path().join("plugs")).unwrap();

    for r in [
        fs.read_file("server.jar", 100).map(|_| ()),
        fs.read_file("innocent", 100).map(|_| ()),
        fs.read_file("door/key", 100).map(|_| ()),
        fs.read_file("secrets/deep/key", 100).map(|_| ()),
        fs.write_file_atomic("plugs/a.jar", b"x"),
        fs.open("innocent", &OpenOptions::replace()).map(|_| ()),
        fs.open("door/new", &OpenOptions::replace()).map(|_| ()),
        fs.open("plugs/b.jar", &OpenOptions::replace()).map(|_| ()),
        fs.remove("secrets").map(|_| ()),
        fs.remove("door/key").map(|_| ()),
        fs.rename("server.jar", "x", false),
        fs.rename("secrets", "y", false),
        fs.copy("innocent", "copy"),
        fs.set_permissions("door/key", 0o777),
        fs.create_dir("door/sub"),
    ] {
        assert!(matches!(r, Err(FsError::Denied(_))), "{r:?}");
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("server.jar")).unwrap(),
        "jar"
    );
    assert!(dir.path().join("secrets/deep/key").exists());
    // Other files are fine, and wings' own work is not bound by the denylist.
    fs.write_file_atomic("plugins/readme.txt", b"ok").unwrap();
    assert_eq!(fs.trusted().read_file("server.jar", 100).unwrap(), b"jar");
    assert!(fs.is_denied("plugins/x.jar"));
    assert!(!fs.trusted().is_denied("plugins/x.jar"));
}

#[test]
fn the_walk_reports_links_and_never_follows_them() {
    let (dir, fs) = root();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("o"), "o").unwrap();
    fs.create_dir_all("a/b").unwrap();
    fs.write_file_atomic("a/b/f", b"f").unwrap();
    fs.write_file_atomic("top", b"t").unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("a/out")).unwrap();
    let paths: Vec<(String, EntryKind)> = fs
        .walk(".")
        .unwrap()
        .map(|e| e.map(|e| (e.path, e.meta.kind)).unwrap())
        .collect();
    assert_eq!(
        paths,
        vec![
            ("a".into(), EntryKind::Directory),
            ("a/b".into(), EntryKind::Directory),
            ("a/b/f".into(), EntryKind::File),
            ("a/out".into(), EntryKind::Symlink),
            ("top".into(), EntryKind::File),
        ]
    );
    let link = fs
        .walk("a")
        .unwrap()
        .find(|e| e.as_ref().unwrap().path == "a/out")
        .unwrap()
        .unwrap();
    assert_eq!(link.symlink_target.as_deref(), outside.path().to_str());
}

#[test]
fn no_operation_reaches_through_a_symlink() {
    let (dir, fs) = root();
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir(outside.path().join("data")).unwrap();
    std::fs::write(outside.path().join("data/keep"), "k").unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("data/keep"), dir.path().join("keep-link")).unwrap();
    std::fs::create_dir(dir.path().join("mine")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("data"), dir.path().join("mine/data-link")).unwrap();

    assert!(escaped(fs.list("out", 0, 10)));
    assert!(escaped(fs.list("out/data", 0, 10)));
    assert!(escaped(fs.create_dir("out/new")));
    assert!(escaped(fs.remove("out/data")));
    assert!(escaped(fs.rename("out/data/keep", "stolen", false)));
    assert!(escaped(fs.rename("mine", "out/mine", false)));
    assert!(escaped(fs.rename("mine", "out/mine", true)));
    assert!(fs.set_permissions("keep-link", 0o777).is_err());
    assert!(fs.set_permissions("out/data/keep", 0o777).is_err());
    // Removing a folder holding a symlink removes the link, not what it points to.
    fs.remove("mine").unwrap();
    fs.remove("keep-link").unwrap();
    assert_eq!(
        std::fs::read_to_string(outside.path().join("data/keep")).unwrap(),
        "k"
    );
    let mode = std::fs::metadata(outside.path().join("data/keep"))
        .unwrap()
        .permissions();
    assert_ne!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o777);
}

/// A folder swapped for a symlink to outside, over and over, while operations run on
/// paths through it: nothing outside is ever touched.
#[test]
fn a_swap_race_never_escapes() {
    let (dir, fs) = root();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("victim"), "safe").unwrap();
    let swap_dir = dir.path().join("swap");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (stop, swap_dir, target) = (stop.clone(), swap_dir.clone(), outside.path().to_path_buf());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::fs::remove_file(&swap_dir);
                let _ = std::fs::create_dir(&swap_dir);
                let _ = std::fs::write(swap_dir.join("victim"), "inside");
                let _ = std::fs::remove_dir_all(&swap_dir);
                let _ = std::os::unix::fs::symlink(&target, &swap_dir);
            }
        })
    };
    for _ in 0..2000 {
        // Whatever is read comes from inside (the swapper's file, half-written, or ours).
        let _ = fs.read_file("swap/victim", 100).map(|d| assert_ne!(d, b"safe"));
        let _ = fs.write_file_atomic("swap/victim", b"overwritten");
        let _ = fs
            .open("swap/victim", &OpenOptions::replace())
            .map(|f| f.write_all_at(b"w", 0));
        let _ = fs.truncate("swap/victim", 0);
        let _ = fs.set_permissions("swap/victim", 0o777);
        let _ = fs.set_times("swap/victim", None, Some(SystemTime::UNIX_EPOCH));
        let _ = fs.remove("swap/victim");
        let _ = fs.rename("swap/victim", "moved", true);
        let _ = fs.copy("swap/victim", "copied");
        let _ = fs.remove("copied");
        let _ = fs.create_dir_all("swap/sub/dir");
        // The walk never enters the link: "safe" (4 bytes) is never met.
        for entry in fs.walk(".").into_iter().flatten().flatten() {
            if let Ok(data) = fs.read_file(&entry.path, 100) {
                assert_ne!(data, b"safe");
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    swapper.join().unwrap();
    assert_eq!(
        std::fs::read_to_string(outside.path().join("victim")).unwrap(),
        "safe"
    );
    assert!(!outside.path().join("sub").exists());
    let meta = std::fs::metadata(outside.path().join("victim")).unwrap();
    assert_ne!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o777
    );
    assert_ne!(std::os::unix::fs::MetadataExt::mtime(&meta), 0);
}

/// The walk opens files by name from the folder handle it holds: the content is read, and a
/// file swapped for a link to something outside after the walk saw it is not followed.
#[test]
fn the_walk_opens_files_from_its_folder_handle_and_never_through_a_swapped_link() {
    let (dir, fs) = root();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), "s").unwrap();
    fs.create_dir_all("a/b").unwrap();
    fs.write_file_atomic("a/b/f", b"content").unwrap();
    fs.write_file_atomic("a/b/g", b"g").unwrap();
    let mut walker = fs.walk(".").unwrap();
    let mut read = Vec::new();
    while let Some(entry) = walker.next() {
        let entry = entry.unwrap();
        if entry.path == "a/b/f" {
            let (mut file, meta) = walker.open_file(&entry).unwrap();
            assert_eq!(meta.size, 7);
            let mut content = String::new();
            std::io::Read::read_to_string(&mut file, &mut content).unwrap();
            read.push(content);
        }
        if entry.path == "a/b/g" {
            std::fs::remove_file(dir.path().join("a/b/g")).unwrap();
            std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("a/b/g")).unwrap();
            assert!(matches!(walker.open_file(&entry), Err(FsError::Symlink(_))));
        }
        if entry.meta.kind == EntryKind::Directory {
            assert!(matches!(walker.open_file(&entry), Err(FsError::NotAFile(_))));
        }
    }
    assert_eq!(read, ["content"]);
}

#[test]
fn the_tree_writer_stays_inside_replaces_what_is_in_the_way_and_counts_the_quota() {
    let (dir, fs) = root_with(1000, &[]);
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cfg")).unwrap();
    std::fs::write(dir.path().join("cfg/old"), vec![1u8; 300]).unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("f"), dir.path().join("cfg/link")).unwrap();
    fs.recount().unwrap();
    let mut buf = [0u8; 7];

    // Without `replace` an existing entry is never opened, a symlinked folder never entered.
    let mut keep = fs.tree_writer(false).unwrap();
    assert!(matches!(
        keep.create_file("cfg/link", 0o644, 1, &mut &b"x"[..], &mut buf),
        Err(FsError::Exists(_))
    ));
    assert!(matches!(
        keep.create_file("out/f", 0o644, 1, &mut &b"x"[..], &mut buf),
        Err(FsError::Symlink(_))
    ));
    assert!(matches!(keep.create_dir("out/sub"), Err(FsError::Symlink(_))));
    assert!(escaped(keep.symlink("../../x", "cfg/up")));
    assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());

    // With it, the link in the way is removed (never written through), and so is a file
    // where a folder must go (its bytes freed).
    let mut writer = fs.tree_writer(true).unwrap();
    let file = writer
        .create_file("cfg/link", 0o600, 20, &mut &[2u8; 20][..], &mut buf)
        .unwrap();
    drop(file);
    assert_eq!(std::fs::read(dir.path().join("cfg/link")).unwrap(), [2u8; 20]);
    assert!(!outside.path().join("f").exists());
    assert!(
        writer.create_dir("cfg/old/deeper").is_err(),
        "only the last component is replaced"
    );
    writer.create_dir("cfg/old").unwrap();
    writer.create_dir("cfg/old/deeper").unwrap();
    assert!(dir.path().join("cfg/old/deeper").is_dir());
    assert_eq!(fs.used_bytes(), 20);
    writer
        .create_file("a/b/c", 0o644, 5, &mut &b"hello"[..], &mut buf)
        .unwrap();
    writer.symlink("../a/b/c", "cfg/c").unwrap();
    assert_eq!(std::fs::read(dir.path().join("cfg/c")).unwrap(), b"hello");

    // Past the quota nothing is written; content that ends early is an error.
    assert!(matches!(
        writer.create_file("big", 0o644, 2000, &mut &[0u8; 2000][..], &mut buf),
        Err(FsError::QuotaExceeded { .. })
    ));
    assert!(!dir.path().join("big").exists());
    assert!(
        writer
            .create_file("short", 0o644, 10, &mut &b"abc"[..], &mut buf)
            .is_err()
    );
    assert_eq!(fs.used_bytes(), 28);
}
