//! The pidfile: the process id, in a file this process holds an exclusive `flock` on, so that two
//! servers pointed at the same pidfile cannot both run (the second one exits with a reason).
//!
//! The file is opened without following a symbolic link (`O_NOFOLLOW`) and must be a regular
//! file: a server started as root in a directory others can write to must not be tricked into
//! writing its pid over whatever file a planted link points at (see [`crate::files`]).

use std::fs::File;
use std::io::{self, Seek, Write};
use std::path::{Path, PathBuf};

use crate::files::FileId;

/// A held pidfile. Removed when dropped (on clean exit), if the path still names it.
pub struct Pidfile {
    path: PathBuf,
    /// The file this process created or took over, so that exit removes that one only.
    id: FileId,
    /// Holding the open file keeps the lock.
    _file: File,
}

impl Pidfile {
    /// The pidfile's path and its locked descriptor, to hand a live upgrade's successor.
    pub fn handed(&self) -> (PathBuf, std::os::fd::RawFd) {
        use std::os::fd::AsRawFd;
        (self.path.clone(), self._file.as_raw_fd())
    }

    /// Leaves the pidfile in place (a live upgrade's successor holds and rewrites it).
    /// Called only as the process exits: the descriptor it leaves open goes with the process.
    pub fn keep(self) {
        std::mem::forget(self);
    }

    /// Opens (creating if needed) and locks `path`, then writes this process's id into it. A
    /// symbolic link, or anything but a regular file, at `path` is refused and left untouched;
    /// a pidfile locked by another server is an error for which [`crate::files::Held::is`]
    /// holds.
    pub fn acquire(path: &Path) -> io::Result<Pidfile> {
        let (mut file, id) = crate::files::lock_exclusive(path, "pidfile")?;
        file.set_len(0)?;
        // From the start: a file handed over by a live upgrade shares its offset with the
        // predecessor's writes.
        file.seek(std::io::SeekFrom::Start(0))?;
        write!(file, "{}", std::process::id())?;
        file.flush()?;
        Ok(Pidfile {
            path: path.to_owned(),
            id,
            _file: file,
        })
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        // Remove while still holding the lock, so no other server can be racing for it; and
        // only this server's own file: if an operator removed it and another server made a
        // new one, that one is the other server's lock and stays.
        self.id.remove_if_same(&self.path);
    }
}
