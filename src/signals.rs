//! What each signal does to a running server (the README's signal table says the same).
//!
//! Every signal whose default would kill the server and that an operator or the system sends on
//! purpose is handled, so that none of them leaves the pidfile and the unix socket behind:
//! the ones meaning "stop" stop cleanly, the others are logged. SIGPIPE stays ignored (Rust's
//! runtime ignores it before `main`: a write to a closed socket or pipe fails on that write).
//! Faults (SIGSEGV, SIGBUS, SIGABRT…) and SIGKILL keep their default: the process cannot go on,
//! and a restart replaces a stale socket and takes over the pidfile, whose lock died with it.

use std::io;
use std::task::Poll;

use nix::libc;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// What a signal asks of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Stop accepting, let every connection get the replies to what it sent (within
    /// `-shutdown-timeout`), close them, remove the pidfile and socket, exit 0. A second
    /// stopping signal meanwhile exits at once.
    Shutdown,
    /// Exit at once without waiting for connections (their locks go with the process), after
    /// removing the pidfile and the socket.
    Quit,
    /// Reopen the log file, and log `reloaded`.
    Reload,
    /// Log one line of status: connections, locks, orphans, dropped log lines.
    Status,
    /// Log that it came, and go on.
    Ignore,
    Upgrade,
    /// Go on without a word: SIGXFSZ comes from a write past the file-size limit (the log file,
    /// say), which then fails instead of killing the server; logging it would only try another
    /// write to that file.
    Silent,
}

/// The handled signals: name, number, action.
pub const TABLE: &[(&str, libc::c_int, Action)] = &[
    ("SIGTERM", libc::SIGTERM, Action::Shutdown),
    ("SIGINT", libc::SIGINT, Action::Shutdown),
    ("SIGQUIT", libc::SIGQUIT, Action::Quit),
    ("SIGHUP", libc::SIGHUP, Action::Reload),
    ("SIGUSR1", libc::SIGUSR1, Action::Status),
    // A live upgrade (nginx's convention): the binary on disk takes over every connection.
    ("SIGUSR2", libc::SIGUSR2, Action::Upgrade),
    // The system's ways of saying "stop now, cleanly": a UPS daemon, the soft CPU limit before
    // the hard one kills, an alarm someone set.
    ("SIGPWR", libc::SIGPWR, Action::Shutdown),
    ("SIGXCPU", libc::SIGXCPU, Action::Shutdown),
    ("SIGALRM", libc::SIGALRM, Action::Shutdown),
    ("SIGXFSZ", libc::SIGXFSZ, Action::Silent),
];

/// The server's signal handlers, installed.
pub struct Signals {
    handlers: Vec<(&'static str, Action, Signal)>,
}

impl Signals {
    /// Installs a handler for every signal in [`TABLE`] (inside a tokio runtime). From here on
    /// none of them can kill the process.
    pub fn install() -> io::Result<Signals> {
        let handlers = TABLE
            .iter()
            .map(|&(name, number, action)| {
                signal(SignalKind::from_raw(number))
                    .map(|handler| (name, action, handler))
                    .map_err(|e| io::Error::new(e.kind(), format!("{name}: {e}")))
            })
            .collect::<io::Result<_>>()?;
        Ok(Signals { handlers })
    }

    /// Waits for the next signal: its name and what it asks.
    pub async fn recv(&mut self) -> (&'static str, Action) {
        std::future::poll_fn(|cx| {
            for (name, action, handler) in &mut self.handlers {
                if handler.poll_recv(cx).is_ready() {
                    return Poll::Ready((*name, *action));
                }
            }
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_signal_is_listed_once() {
        for (i, (name, number, _)) in TABLE.iter().enumerate() {
            assert!(
                TABLE[i + 1..]
                    .iter()
                    .all(|(n, s, _)| n != name && s != number),
                "{name} twice"
            );
        }
    }

    #[test]
    fn stopping_signals_stop_and_the_others_do_not() {
        let action = |wanted: &str| {
            TABLE
                .iter()
                .find(|(name, _, _)| *name == wanted)
                .map(|&(_, _, action)| action)
        };
        assert_eq!(action("SIGTERM"), Some(Action::Shutdown));
        assert_eq!(action("SIGINT"), Some(Action::Shutdown));
        assert_eq!(action("SIGQUIT"), Some(Action::Quit));
        assert_eq!(action("SIGHUP"), Some(Action::Reload));
        assert_eq!(action("SIGUSR1"), Some(Action::Status));
        assert_eq!(action("SIGUSR2"), Some(Action::Upgrade));
        // Ignored by Rust's runtime; a handler would only add wake-ups.
        assert_eq!(action("SIGPIPE"), None);
    }
}
