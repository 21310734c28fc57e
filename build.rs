//! Embeds the git commit the binary was built from (`GLOCKD_COMMIT`), for `--version` and the
//! start-up line. A build outside a git checkout (a source tarball, a vendored copy) says
//! `unknown`; setting `GLOCKD_COMMIT` in the build's environment overrides both.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=GLOCKD_COMMIT");
    let commit = std::env::var("GLOCKD_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=GLOCKD_COMMIT={}", commit.trim());
}

/// The short hash of HEAD, and the files whose change means a new commit (so that committing
/// without touching the sources still rebuilds with the new hash).
fn git_commit() -> Option<String> {
    let commit = git(&["rev-parse", "--short", "HEAD"])?;
    for file in ["HEAD", "packed-refs"] {
        watch(git(&["rev-parse", "--git-path", file]));
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch(git(&["rev-parse", "--git-path", &branch]));
    }
    Some(commit)
}

fn watch(path: Option<String>) {
    if let Some(path) = path.filter(|p| Path::new(p).exists()) {
        println!("cargo:rerun-if-changed={path}");
    }
}

/// One line of git's output, or None if git is missing, fails, or says nothing.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let line = text.trim();
    (out.status.success() && !line.is_empty()).then(|| line.to_owned())
}
