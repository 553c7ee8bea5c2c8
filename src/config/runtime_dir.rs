//! Where the process keeps its own files when the gateway file does not
//! say: Pingora's `upgrade_sock` (through which a new process takes the
//! listening sockets at a graceful upgrade) and `pid_file`.
//!
//! Pingora's defaults sit in `/tmp`, where any local user can create the
//! socket first and receive the gateway's listeners, or point the pid file
//! elsewhere. pingress defaults to a directory only its own user may
//! enter (mode 0700), chosen the same way by the old and the new process
//! of an upgrade: `$XDG_RUNTIME_DIR/pingress`, else `/run/pingress` where
//! the process may create it, else `pingress-<uid>` in the temporary
//! directory. The file names carry a digest of the gateway file's path, so
//! two gateways of one user keep apart.

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The private directory for this process's files. Called when the
/// gateway starts serving (never by `-t` or a reload), as it may create
/// `/run/pingress`.
pub fn default_dir() -> PathBuf {
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(runtime).join("pingress");
    }
    let run = Path::new("/run/pingress");
    let ours = |meta: fs::Metadata| meta.is_dir() && meta.uid() == uid();
    if fs::symlink_metadata(run).is_ok_and(ours)
        || DirBuilder::new().mode(0o700).create(run).is_ok()
    {
        return run.to_path_buf();
    }
    std::env::temp_dir().join(format!("pingress-{}", uid()))
}

/// `upgrade.sock` and `pid` names for the gateway file at `gateway_path`.
pub fn file_names(gateway_path: &Path) -> (String, String) {
    let digest = openssl::sha::sha256(gateway_path.as_os_str().as_encoded_bytes());
    let tag: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    (format!("upgrade-{tag}.sock"), format!("pingress-{tag}.pid"))
}

/// Creates `dir` with mode 0700, or checks that it is a directory of this
/// user's that no one else may enter (and makes it so if only its mode is
/// wrong).
pub fn ensure_private(dir: &Path) -> Result<(), RuntimeDirError> {
    let dir_buf = || dir.to_path_buf();
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|error| RuntimeDirError::Create {
                dir: dir_buf(),
                error,
            }),
        Err(error) => Err(RuntimeDirError::Unreadable {
            dir: dir_buf(),
            error,
        }),
        Ok(meta) if meta.file_type().is_symlink() || !meta.is_dir() => {
            Err(RuntimeDirError::NotADirectory { dir: dir_buf() })
        }
        Ok(meta) if meta.uid() != uid() => Err(RuntimeDirError::NotOurs {
            dir: dir_buf(),
            owner: meta.uid(),
            user: uid(),
        }),
        Ok(meta) if meta.mode() & 0o077 != 0 => {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|error| {
                RuntimeDirError::Chmod {
                    dir: dir_buf(),
                    error,
                }
            })
        }
        Ok(_) => Ok(()),
    }
}

/// The private runtime directory cannot be made or is not private.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeDirError {
    #[error("runtime directory {dir}: cannot create it: {error}")]
    Create { dir: PathBuf, error: io::Error },
    #[error("runtime directory {dir}: {error}")]
    Unreadable { dir: PathBuf, error: io::Error },
    #[error(
        "runtime directory {dir}: is not a directory (a symbolic link is refused: it could lead \
         anywhere)"
    )]
    NotADirectory { dir: PathBuf },
    #[error("runtime directory {dir}: belongs to user {owner}, not to this process's user {user}")]
    NotOurs { dir: PathBuf, owner: u32, user: u32 },
    #[error("runtime directory {dir}: cannot make it private: {error}")]
    Chmod { dir: PathBuf, error: io::Error },
}

/// Whether any user may create files in the directory that holds `path`.
pub fn in_world_writable_dir(path: &Path) -> bool {
    path.parent()
        .and_then(|parent| fs::metadata(parent).ok())
        .is_some_and(|meta| meta.mode() & 0o002 != 0)
}

/// The process's effective user, from `/proc/self/status` (`Uid:` real,
/// effective, saved, filesystem). Not the owner of `/proc/self`, which is
/// root for a process that is not dumpable (one with file capabilities).
fn uid() -> u32 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1))
                .and_then(|euid| euid.parse().ok())
        })
        .unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_directory_is_made_or_kept_private() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("run");
        ensure_private(&dir).unwrap();
        let mode = fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // Too open: tightened.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        ensure_private(&dir).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn a_link_or_a_file_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let target = base.path().join("elsewhere");
        fs::create_dir(&target).unwrap();
        let link = base.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = ensure_private(&link).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        let file = base.path().join("file");
        fs::write(&file, "").unwrap();
        assert!(ensure_private(&file).is_err());
    }

    #[test]
    fn names_differ_by_gateway_file_and_are_stable() {
        let a = file_names(Path::new("/etc/pingress/a.yaml"));
        assert_eq!(a, file_names(Path::new("/etc/pingress/a.yaml")));
        assert_ne!(a, file_names(Path::new("/etc/pingress/b.yaml")));
        assert!(a.0.ends_with(".sock") && a.1.ends_with(".pid"));
    }

    #[test]
    fn tmp_is_world_writable() {
        assert!(in_world_writable_dir(Path::new("/tmp/pingress.pid")));
        let base = tempfile::tempdir().unwrap();
        assert!(!in_world_writable_dir(&base.path().join("x.pid")));
    }
}
