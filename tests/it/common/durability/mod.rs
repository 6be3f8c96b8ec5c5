//! The durability tests' tools (contract §7): the kill -9 world and its streams, a tmpfs mount
//! for the full-disk test, and a seeded generator. The broker runs as a real child process
//! ([`crate::common::ops::Proc`]): `kill -9` must cut it off with no destructor, no final
//! flush and no chance to finish a commit, exactly as an operator's `kill -9` or a crash
//! does; only a separate process gives that. Packets go through the raw client
//! ([`crate::common::coretests::raw`]), which sees every packet id and flag.

pub mod flows;
pub mod world;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted on a directory, unmounted on drop (contract §7's full-disk test).
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// `mount -t tmpfs -o size=SIZE tmpfs DIR` (needs root, as in CI).
    pub fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }
}

impl Tmpfs {
    /// [`Tmpfs::mount`], or None (after saying so) when mounting is not possible and
    /// `CERTMQ_SKIP_MOUNT_TESTS` is set; otherwise a failure to mount fails the test, since
    /// CI runs as root.
    pub fn mount_or_skip(dir: &Path, size: &str) -> Option<Tmpfs> {
        match Tmpfs::mount(dir, size) {
            Ok(m) => Some(m),
            Err(e) if std::env::var_os("CERTMQ_SKIP_MOUNT_TESTS").is_some() => {
                eprintln!("skipped (CERTMQ_SKIP_MOUNT_TESTS is set): {e}");
                None
            }
            Err(e) => panic!("{e}; this test needs root (set CERTMQ_SKIP_MOUNT_TESTS to skip it)"),
        }
    }
}

impl Tmpfs {
    /// `mount -o remount,MODE DIR`: `ro` makes the store read-only under a running broker
    /// (root bypasses file permissions, a read-only file system it cannot), `rw` undoes it.
    pub fn remount(&self, mode: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&self.dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "remount {mode} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("mount")
            .args(["-o", "remount,rw"])
            .arg(&self.dir)
            .status();
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Something still holds a file there: detach it so the tempdir can go.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Writes `path` until the file system is full (ENOSPC), down to the last byte.
pub fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).expect("create filler");
    for chunk in [1 << 16, 4096, 512, 1] {
        let buf = vec![0x5a; chunk];
        loop {
            match f.write(&buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    // Data already written stays; a failing fsync only says the disk is full.
    let _ = f.sync_all();
}

/// SplitMix64: a small seeded generator, so a failing run can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo) as u64) as usize
    }
}
