//! Files a server makes or holds beside its sockets: which file a path names, and exclusive
//! locks on a file for as long as the process runs.
//!
//! A server removes what it made at exit (its unix socket, its pidfile), but only if the path
//! still names the very file it made: an operator may have removed it meanwhile and another
//! server made its own under the same name, which must not lose it to the first server's exit.
//! A file is known by its device and inode ([`FileId`]), not by its name.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Which file a path named when it was looked at: its device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The file `path` names now (a symbolic link itself, not what it points at).
    pub fn of_path(path: &Path) -> io::Result<FileId> {
        Ok(FileId::of(&std::fs::symlink_metadata(path)?))
    }

    /// The file these metadata describe.
    pub fn of(meta: &std::fs::Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    /// Removes `path` if it still names this file; another file that took its place stays.
    /// The file must be held open (or [`Pinned`]) meanwhile, or its inode number may have gone
    /// to the file now there. Whatever replaces the file between the look and the removal is not seen: the window is
    /// one `lstat` wide, and closing it would need an unlink-if-inode the kernel does not have.
    pub fn remove_if_same(self, path: &Path) -> bool {
        FileId::of_path(path).is_ok_and(|now| now == self) && std::fs::remove_file(path).is_ok()
    }
}

/// A file this server made, known by its device and inode, and kept from giving them up: a
/// descriptor opened with `O_PATH` (which reads nothing, and opens a socket file too) holds the
/// inode, so no other file can be given the same inode number while this is held. Without it,
/// a socket file another server unlinked once this one had closed its listener is freed, and a
/// filesystem such as ext4 hands its inode number straight to the next file made, which may be
/// that other server's socket on the same path.
#[derive(Debug)]
pub struct Pinned {
    id: FileId,
    _fd: File,
}

impl Pinned {
    /// Pins the file `path` names now (a symbolic link is not followed).
    pub fn open(path: &Path) -> io::Result<Pinned> {
        let fd = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_PATH | nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(path)?;
        Ok(Pinned {
            id: FileId::of(&fd.metadata()?),
            _fd: fd,
        })
    }

    /// Which file it is.
    pub fn id(&self) -> FileId {
        self.id
    }
}

/// Another process holds the lock on a file this server needs for itself (a pidfile, a state
/// file): the server must not start. Its text is the one line the operator sees.
#[derive(Debug)]
pub struct Held {
    /// What the file is to the server, as the flag calls it ("pidfile", "state file").
    pub what: &'static str,
    pub path: PathBuf,
}

impl std::fmt::Display for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} is locked by another running glockd",
            self.what,
            self.path.display()
        )
    }
}

impl std::error::Error for Held {}

impl Held {
    /// Whether `e` says a file is held by another server (see [`lock_exclusive`]).
    pub fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<Held>())
    }
}

/// Locked files a live upgrade's predecessor handed over (its pidfile, the state file's lock),
/// by path: their `flock` belongs to the open file they share, so they are held already.
static INHERITED: std::sync::Mutex<Vec<(std::path::PathBuf, File)>> =
    std::sync::Mutex::new(Vec::new());

/// Records a locked file handed over by a live upgrade's predecessor, for [`lock_exclusive`]
/// to take instead of locking `path` anew (which the predecessor's lock would refuse).
pub fn inherit_locked(path: std::path::PathBuf, file: File) {
    INHERITED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((path, file));
}

fn take_inherited(path: &Path) -> Option<File> {
    let mut inherited = INHERITED.lock().unwrap_or_else(|e| e.into_inner());
    let at = inherited.iter().position(|(p, _)| p == path)?;
    Some(inherited.swap_remove(at).1)
}

/// Opens (creating if needed) the regular file at `path` and takes an exclusive `flock` on it
/// without waiting; the lock lasts as long as the returned file is open. A symbolic link at
/// `path` is never followed, nor anything but a regular file opened: a server started as root
/// in a directory others can write to must not be tricked into locking or writing whatever a
/// planted link points at. Locked by another process: an error for which [`Held::is`] holds.
///
/// The file locked is the one `path` names once the lock is held: a file removed (by a server
/// exiting) between the open and the lock is let go and the new one opened instead, so two
/// servers never each hold a lock on a different file of the same name.
pub fn lock_exclusive(path: &Path, what: &'static str) -> io::Result<(File, FileId)> {
    if let Some(file) = take_inherited(path) {
        let id = FileId::of(&file.metadata()?);
        return Ok((file, id));
    }
    let not_followed = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{what} {} is a symbolic link or not a regular file; refusing to write through it",
                path.display()
            ),
        )
    };
    // Each retry means the file was removed or replaced in the moment between open and lock;
    // a few in a row is already a server starting and stopping in a tight loop beside us.
    for _ in 0..8 {
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            // A link at the last component fails with ELOOP instead of being followed; a FIFO
            // opens without blocking, and is refused below.
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
            .open(path)
        {
            Ok(file) => file,
            Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => return Err(not_followed()),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{what} {}: {e}", path.display()),
                ))
            }
        };
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(not_followed());
        }
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    Held {
                        what,
                        path: path.to_owned(),
                    },
                ))
            }
            Err(TryLockError::Error(e)) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{what} {}: cannot lock: {e}", path.display()),
                ))
            }
        }
        let id = FileId::of(&meta);
        match FileId::of_path(path) {
            Ok(now) if now == id => return Ok((file, id)),
            // Removed or replaced after the open: lock what the name names now.
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{what} {}: {e}", path.display()),
                ))
            }
        }
    }
    Err(io::Error::other(format!(
        "{what} {}: replaced again and again while being locked",
        path.display()
    )))
}
