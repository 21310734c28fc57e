//! The results of a run: one line per check for people, or one JSON document for programs.

use std::fmt;

use serde::Serialize;

/// How one check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

/// The result of one check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// The check's stable name, for grepping and for `--only`.
    pub name: &'static str,
    /// Passed, failed or skipped.
    pub status: Status,
    /// Why it failed or was skipped (empty when it passed).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl fmt::Display for CheckResult {
    /// `PASS name`, `FAIL name: detail`, `SKIP name: detail`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = match self.status {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
        };
        if self.detail.is_empty() {
            write!(f, "{word} {}", self.name)
        } else {
            write!(f, "{word} {}: {}", self.name, self.detail)
        }
    }
}

/// Everything a run found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The server checked, as the transport describes it (`tcp 127.0.0.1:9999`).
    pub target: String,
    /// Whether only the original server's behaviour was checked.
    pub compat: bool,
    /// The prefix of every lock and registered name the run used, to find its traces in logs.
    pub prefix: String,
    /// Every check, in the order run.
    pub checks: Vec<CheckResult>,
    /// Checks that passed.
    pub passed: usize,
    /// Checks that failed.
    pub failed: usize,
    /// Checks that did not apply.
    pub skipped: usize,
}

impl Report {
    /// An empty report for `target`.
    pub fn new(target: String, compat: bool, prefix: String) -> Self {
        Report {
            target,
            compat,
            prefix,
            checks: Vec::new(),
            passed: 0,
            failed: 0,
            skipped: 0,
        }
    }

    /// Adds one result and counts it.
    pub fn push(&mut self, result: CheckResult) {
        match result.status {
            Status::Pass => self.passed += 1,
            Status::Fail => self.failed += 1,
            Status::Skip => self.skipped += 1,
        }
        self.checks.push(result);
    }

    /// The result of the check called `name`, if it ran.
    pub fn get(&self, name: &str) -> Option<&CheckResult> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// The status of the check called `name`, if it ran.
    pub fn status(&self, name: &str) -> Option<Status> {
        self.get(name).map(|c| c.status)
    }

    /// The closing line: `N passed, N failed, N skipped`.
    pub fn summary(&self) -> String {
        format!(
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        )
    }

    /// True when nothing failed (the exit status is 0 exactly then).
    pub fn ok(&self) -> bool {
        self.failed == 0
    }

    /// The report as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        // Serialising plain strings, numbers and enums cannot fail; fall back to a minimal
        // document rather than panic if it ever did.
        serde_json::to_string_pretty(self)
            .unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()))
    }
}
