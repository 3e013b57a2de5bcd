//! What an operator sees: start-up text, errors, signals.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmm_sys_util::tempdir::TempDir;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vfio-user-device"))
}

/// Runs the daemon expecting failure; returns its stderr.
fn fails(args: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    err
}

#[test]
fn bad_options_give_one_clear_line() {
    let dir = TempDir::new().unwrap();
    let sock = dir.as_path().join("s.sock");
    let s = sock.to_str().unwrap();
    assert!(fails(&[]).contains("device kind"));
    assert!(fails(&["virtio-blk"]).contains("--socket"));
    assert!(fails(&["virtio-blk", "--socket", s, "--bogus"]).contains("--bogus"));
    assert!(fails(&["virtio-blk", "--socket", s, "--queue-size", "3"]).contains("power of two"));
    let missing = fails(&[
        "virtio-blk",
        "--socket",
        s,
        "--disk",
        "/nonexistent/disk.img",
    ]);
    assert!(missing.contains("/nonexistent/disk.img"), "{missing}");
    std::fs::write(&sock, b"taken").unwrap();
    assert!(fails(&["virtio-blk", "--socket", s]).contains("already exists"));
}

/// A virtio-blk daemon on `sock`, its stdout a pipe to the test.
fn spawn_piped(sock: &std::path::Path) -> std::process::Child {
    bin()
        .args(["virtio-blk", "--socket", sock.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn prints_attach_commands_and_stops_on_sigterm() {
    let dir = TempDir::new().unwrap();
    let sock = dir.as_path().join("blk.sock");
    let mut child = spawn_piped(&sock);
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut text = String::new();
    while !text.contains("SIGTERM") {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            break;
        }
        text.push_str(&line);
    }
    let s = sock.to_str().unwrap();
    assert!(
        text.contains(&format!("--user-device socket={s}")),
        "{text}"
    );
    assert!(text.contains("shared=on"), "{text}");
    assert!(text.contains("vfio-user-pci") && text.contains(s), "{text}");
    assert!(text.contains("64 MiB"), "{text}");
    assert!(sock.exists());
    // SAFETY: sending SIGTERM to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "daemon ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    assert!(!sock.exists(), "socket left behind");
}

/// A script that reads the start-up line and closes the pipe (`| head -1`)
/// does not take the daemon down.
#[test]
fn a_closed_stdout_does_not_stop_the_daemon() {
    let dir = TempDir::new().unwrap();
    let sock = dir.as_path().join("blk.sock");
    let mut child = spawn_piped(&sock);
    drop(child.stdout.take());
    common::wait_for_socket(&sock);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the daemon exited: {:?}",
        child.try_wait()
    );
    std::os::unix::net::UnixStream::connect(&sock).unwrap();
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn help_exits_zero_on_stdout() {
    for args in [
        &["--help"][..],
        &["virtio-blk", "--help"],
        &["virtio-blk", "-h"],
    ] {
        let out = bin().args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        assert!(out.stderr.is_empty(), "{args:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("virtio-blk"), "{args:?}: {text}");
        if args.len() > 1 {
            assert!(text.contains("--disk"), "{args:?}: {text}");
            assert!(text.contains("--socket"), "{args:?}: {text}");
        }
    }
}

/// Runs the daemon with `args` after `virtio-blk --socket S` and RUST_LOG
/// set to `rust_log`, stops it with SIGTERM and returns its stderr.
fn log_of(rust_log: &str, args: &[&str]) -> String {
    let dir = TempDir::new().unwrap();
    let sock = dir.as_path().join("blk.sock");
    let child = bin()
        .args(["virtio-blk", "--socket", sock.to_str().unwrap()])
        .args(args)
        .env("RUST_LOG", rust_log)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    common::wait_for_socket(&sock);
    // SAFETY: sending SIGTERM to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{args:?}");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn log_level_wins_over_rust_log() {
    // The daemon logs "stopping; removing SOCKET" at info level.
    assert!(log_of("info", &[]).contains("stopping"));
    assert!(!log_of("warn", &[]).contains("stopping"));
    assert!(!log_of("info", &["--log-level", "warn"]).contains("stopping"));
    assert!(log_of("error", &["--log-level", "info"]).contains("stopping"));
    assert!(fails(&["virtio-blk", "--socket", "s", "--log-level", "loud"]).contains("--log-level"));
}
