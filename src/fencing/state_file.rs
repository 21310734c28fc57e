//! The state file: its versioned text format, and writing it so that a crash leaves either the
//! old ceiling or the new one, never a torn file.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{MAX_CEILING, MAX_STATE_BYTES, STATE_VERSION};
use crate::files::Held;

/// The file that keeps the ceiling, held by this server alone.
pub(super) struct StateFile {
    pub(super) path: PathBuf,
    /// Written first, then renamed over `path`.
    temp: PathBuf,
    /// `path`'s directory, synced after the rename so the new name survives a crash.
    dir: PathBuf,
    slow_write: Option<Duration>,
    /// `PATH.lock`, open with an exclusive `flock` for as long as this server runs: two servers
    /// on one state file would each hand out tokens above their own ceiling, not above each
    /// other's. The lock is on a file beside the state file because every write renames a new
    /// file over `path`, and a lock on the replaced file would go with it. It is never removed
    /// (removing it would let a server lock a new file while another still holds the old one).
    _lock: File,
}

impl StateFile {
    /// `PATH.lock`'s path and descriptor.
    pub(super) fn lock_file(&self) -> (PathBuf, std::os::fd::RawFd) {
        use std::os::fd::AsRawFd;
        let mut name = self.path.as_os_str().to_owned();
        name.push(".lock");
        (PathBuf::from(name), self._lock.as_raw_fd())
    }

    /// Takes the state file at `path` for this server: locks `PATH.lock` (creating it), or
    /// fails if another server holds it. The state file itself is not read yet.
    pub(super) fn open(path: &Path, slow_write: Option<Duration>) -> io::Result<Self> {
        let with_suffix = |suffix: &str| {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        };
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let lock = match crate::files::lock_exclusive(&with_suffix(".lock"), "lock file") {
            Ok((lock, _)) => lock,
            Err(e) if Held::is(&e) => {
                return Err(io::Error::new(
                    e.kind(),
                    Held {
                        what: "state file",
                        path: path.to_path_buf(),
                    },
                ))
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("state file {}: cannot write: {e}", path.display()),
                ))
            }
        };
        Ok(StateFile {
            path: path.to_path_buf(),
            temp: with_suffix(".tmp"),
            dir,
            slow_write,
            _lock: lock,
        })
    }

    /// An error naming the file, on one line.
    pub(super) fn error(&self, what: &str, e: impl std::fmt::Display) -> io::Error {
        io::Error::other(format!("state file {}: {what}: {e}", self.path.display()))
    }

    /// The saved ceiling, or None when there is no file yet.
    pub(super) fn read(&self) -> io::Result<Option<u64>> {
        let mut text = Vec::new();
        match File::open(&self.path) {
            Ok(file) => file
                .take(MAX_STATE_BYTES + 1)
                .read_to_end(&mut text)
                .map_err(|e| self.error("cannot read", e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.error("cannot read", e)),
        };
        if text.len() as u64 > MAX_STATE_BYTES {
            return Err(self.error(
                "not a glockd state file",
                format!("longer than {MAX_STATE_BYTES} bytes"),
            ));
        }
        parse_state(&text)
            .map(Some)
            .map_err(|reason| self.error("not a valid glockd state file", reason))
    }

    /// Replaces the file with one holding `ceiling`, durably: temporary file, fsync, rename,
    /// fsync of the directory. A crash at any point leaves either the old file or the new one.
    pub(super) fn write(&self, ceiling: u64) -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&self.temp)?;
        file.write_all(render_state(ceiling).as_bytes())?;
        file.sync_all()?;
        drop(file);
        if let Some(delay) = self.slow_write {
            std::thread::sleep(delay);
        }
        std::fs::rename(&self.temp, &self.path)?;
        File::open(&self.dir)?.sync_all()
    }
}

/// The state file's text for `ceiling`.
pub fn render_state(ceiling: u64) -> String {
    format!(
        "# glockd state: every fencing token this server has issued is below the ceiling.\n\
         glockd-state {STATE_VERSION}\n\
         ceiling {ceiling}\n"
    )
}

/// The ceiling in a state file's text, or why the text is not a state file.
pub fn parse_state(text: &[u8]) -> Result<u64, String> {
    if text.iter().all(u8::is_ascii_whitespace) {
        return Err("the file is empty".into());
    }
    let text = std::str::from_utf8(text).map_err(|_| "the file is not text".to_owned())?;
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(at, line)| (at + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'));
    let number = |at: usize, key: &str, value: &str| -> Result<u64, String> {
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "line {at}: `{key}` needs a whole number, not {value:?}"
            ));
        }
        value
            .parse::<u64>()
            .map_err(|_| format!("line {at}: {key} {value} is too large"))
    };
    let split = |line: &'_ str| -> (String, String) {
        let (key, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        (key.to_owned(), value.trim().to_owned())
    };
    let Some((at, first)) = lines.next() else {
        return Err("no `glockd-state` line".into());
    };
    let (key, value) = split(first);
    if key != "glockd-state" {
        return Err(format!(
            "line {at}: expected `glockd-state {STATE_VERSION}`, found {:?}",
            truncated(first)
        ));
    }
    let version = number(at, "glockd-state", &value)?;
    if version != STATE_VERSION {
        return Err(format!(
            "version {version} is not supported (this glockd reads version {STATE_VERSION})"
        ));
    }
    let mut ceiling = None;
    for (at, line) in lines {
        let (key, value) = split(line);
        match key.as_str() {
            "ceiling" if ceiling.is_none() => ceiling = Some(number(at, "ceiling", &value)?),
            "ceiling" => return Err(format!("line {at}: a second `ceiling`")),
            _ => return Err(format!("line {at}: unknown setting {:?}", truncated(line))),
        }
    }
    let ceiling = ceiling.ok_or_else(|| "no `ceiling` line".to_owned())?;
    if ceiling > MAX_CEILING {
        return Err(format!("ceiling {ceiling} leaves no room for more tokens"));
    }
    Ok(ceiling)
}

/// At most 40 characters of `line`, for an error message.
fn truncated(line: &str) -> String {
    line.chars().take(40).collect()
}
