//! The README's "Writing a client" section carries a complete Python client; this keeps it
//! true: the file in `examples/python` is the one in the README, and it works against the
//! server.

mod common;

use std::process::Command;

const CLIENT: &str = include_str!("../examples/python/glockd_client.py");

#[test]
fn the_readme_shows_the_client_that_is_tested() {
    let readme = include_str!("../README.md");
    assert!(
        readme.contains(CLIENT),
        "README.md's Python client differs from examples/python/glockd_client.py"
    );
    assert!(
        CLIENT.lines().count() < 60,
        "the client is meant to fit a page"
    );
}

#[test]
fn the_python_client_works_against_the_server() {
    let python = Command::new("python3").arg("--version").output();
    if python.is_err() {
        assert!(
            std::env::var_os("GLOCKD_REQUIRE_PYTHON").is_none(),
            "python3 is required (GLOCKD_REQUIRE_PYTHON is set) but missing"
        );
        eprintln!("skipped: python3 is not installed");
        return;
    }
    let server = common::TestServer::start(2);
    let output = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/python/glockd_client.py"
        ))
        .arg(server.addr.port().to_string())
        .output()
        .expect("run python3");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[0], "got True again True");
    assert!(
        lines[1].starts_with("holders ['report-42: 127.0.0.1:"),
        "{text}"
    );
    assert_eq!(lines[2], "locks 1 released True");
    assert_eq!(server.stats().locks, 0);
}

/// The same client with `user` and `token`, against a server with a users file.
#[test]
fn the_python_client_authenticates() {
    if Command::new("python3").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("GLOCKD_REQUIRE_PYTHON").is_none(),
            "python3 is required (GLOCKD_REQUIRE_PYTHON is set) but missing"
        );
        eprintln!("skipped: python3 is not installed");
        return;
    }
    let dir = std::env::temp_dir().join(format!("glockd-python-users-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let path = dir.join("users.toml");
    let line = glockd::users::token::hash_token_line(b"py-token").expect("a token");
    std::fs::write(
        &path,
        format!(
            "[[user]]\nname = \"billing\"\n{line}\nprefixes = ['billing:*']\n\
             classes = [\"lock\", \"inspect\"]\n"
        ),
    )
    .expect("users file");
    let users = path.clone().into_os_string();
    let server = common::TestServer::start_with(2, move |c| {
        c.users = Some(users);
        c.auth_fail_delay_ms = 0;
    });
    let script = format!(
        "import sys\n\
         sys.path.insert(0, {dir:?})\n\
         from glockd_client import Glockd\n\
         lock = Glockd(port={port}, user='billing', token='py-token')\n\
         print(lock.get('billing:a'), lock.ask('g ops:x'), lock.listing('d'))\n\
         try:\n    Glockd(port={port}, user='billing', token='wrong')\n\
         except PermissionError as e:\n    print('refused', e)\n",
        dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python"),
        port = server.addr.port(),
    );
    let output = Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("run python3");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with("True (0, 'Permission Denied') ['billing:a: 127.0.0.1:"),
        "{text}"
    );
    assert_eq!(lines[1], "refused auth refused for user billing");
    let _ = std::fs::remove_dir_all(&dir);
}
