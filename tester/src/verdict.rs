//! Why a check did not pass: it failed (the server broke a rule, or did not answer in time), or
//! it was skipped (the server has the feature turned off, or the mode leaves it out).
//!
//! Checks return `Result<(), Verdict>` so that every step can use `?`: the first broken
//! expectation ends the check with a message that says what was expected and what came back.

use std::fmt::Display;

/// The end of a check that did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The server broke a rule; the text says what was expected and what came instead.
    Fail(String),
    /// The check could not apply here; the text says why.
    Skip(String),
}

impl Verdict {
    /// A failure with a free-form message.
    pub fn fail(message: impl Into<String>) -> Self {
        Verdict::Fail(message.into())
    }

    /// A failure of the form `what: expected X, got Y`.
    pub fn expected(what: impl Display, expected: impl Display, got: impl Display) -> Self {
        Verdict::Fail(format!("{what}: expected {expected}, got {got}"))
    }

    /// A skipped check.
    pub fn skip(why: impl Into<String>) -> Self {
        Verdict::Skip(why.into())
    }
}

/// Fails with `what: expected X, got Y` unless `ok`.
pub fn ensure(
    ok: bool,
    what: impl Display,
    expected: impl Display,
    got: impl Display,
) -> Result<(), Verdict> {
    if ok {
        Ok(())
    } else {
        Err(Verdict::expected(what, expected, got))
    }
}

/// Text shown as it was received, quoted, for messages.
pub fn quoted(text: &str) -> String {
    format!("{text:?}")
}
