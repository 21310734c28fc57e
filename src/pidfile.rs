//! The pidfile: the process id, in a file this process holds an exclusive `flock` on, so that two
//! servers pointed at the same pidfile cannot both run (the second one exits with a reason).
//!
//! The file is opened without following a symbolic link (`O_NOFOLLOW`) and must be a regular
//! file: a server started as root in a directory others can write to must not be tricked into
//! writing its pid over whatever file a planted link points at.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A held pidfile. Removed when dropped (on clean exit).
pub struct Pidfile {
    path: PathBuf,
    /// Holding the open file keeps the lock.
    _file: File,
}

impl Pidfile {
    /// Opens (creating if needed) and locks `path`, then writes this process's id into it. A
    /// symbolic link, or anything but a regular file, at `path` is refused and left untouched.
    pub fn acquire(path: &Path) -> io::Result<Pidfile> {
        let not_followed = || {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "pidfile {} is a symbolic link or not a regular file; refusing to write through it",
                    path.display()
                ),
            )
        };
        let mut file = match OpenOptions::new()
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
                    format!("pidfile {}: {e}", path.display()),
                ))
            }
        };
        if !file.metadata()?.is_file() {
            return Err(not_followed());
        }
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "pidfile {} is locked by another running glockd",
                        path.display()
                    ),
                ))
            }
            Err(TryLockError::Error(e)) => return Err(e),
        }
        file.set_len(0)?;
        write!(file, "{}", std::process::id())?;
        file.flush()?;
        Ok(Pidfile {
            path: path.to_owned(),
            _file: file,
        })
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        // Remove while still holding the lock, so no other server can be racing for it.
        let _ = std::fs::remove_file(&self.path);
    }
}
