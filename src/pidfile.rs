//! The pidfile: the process id, in a file this process holds an exclusive `flock` on, so that two
//! servers pointed at the same pidfile cannot both run (the second one exits with a reason).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A held pidfile. Removed when dropped (on clean exit).
pub struct Pidfile {
    path: PathBuf,
    /// Holding the open file keeps the lock.
    _file: File,
}

impl Pidfile {
    /// Opens (creating if needed) and locks `path`, then writes this process's id into it.
    pub fn acquire(path: &Path) -> io::Result<Pidfile> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
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
