//! `k2proxy check` and `k2proxy run` as an operator meets them.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::k2proxy_bin;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn k2(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(k2proxy_bin()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn repo_files_are_valid_with_both_policies() {
    let routes = repo().join("routes.toml");
    for policy in ["policies/default.toml", "policies/holiday-peak.toml"] {
        let (code, out, err) = k2(&[
            "check",
            "--routes",
            routes.to_str().unwrap(),
            "--policy",
            repo().join(policy).to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{policy}: {err}");
        assert_eq!(out.lines().count(), 1, "one-line summary: {out}");
        assert!(
            out.starts_with("ok: ") && out.contains("5 routes, 5 tiers"),
            "{out}"
        );
    }
    // Without --policy, [server].policy is used, relative to routes.toml.
    let (code, out, _) = k2(&["check", "--routes", routes.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("policies/default.toml"), "{out}");
}

/// A copy of the repo's files with one edit to routes.toml.
fn broken_copy(edit: impl Fn(String) -> String) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    let routes = std::fs::read_to_string(repo().join("routes.toml")).unwrap();
    std::fs::write(dir.path().join("routes.toml"), edit(routes)).unwrap();
    std::fs::copy(
        repo().join("policies/default.toml"),
        dir.path().join("policies/default.toml"),
    )
    .unwrap();
    dir
}

#[test]
fn check_on_a_broken_file_prints_its_location_and_exits_1() {
    let dir = broken_copy(|r| r.replace("tier = \"admin\"", "tier = \"admn\""));
    let routes = dir.path().join("routes.toml");
    let (code, out, err) = k2(&["check", "--routes", routes.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    let line = std::fs::read_to_string(&routes)
        .unwrap()
        .lines()
        .position(|l| l.contains("\"admn\""))
        .unwrap()
        + 1;
    let want = format!(
        "{}:{line}:8: error: unknown tier \"admn\"",
        routes.display()
    );
    assert!(err.starts_with(&want), "want {want}\ngot {err}");
    assert!(err.contains("tier = \"admn\"\n"), "quotes the line: {err}");
}

#[test]
fn run_refuses_an_invalid_file_with_the_same_message() {
    let dir = broken_copy(|r| r.replace("threads = 2", "threads = 2\nworkers = 4"));
    let routes = dir.path().join("routes.toml");
    let (check_code, _, check_err) = k2(&["check", "--routes", routes.to_str().unwrap()]);
    let (run_code, _, run_err) = k2(&["run", "--routes", routes.to_str().unwrap()]);
    assert_eq!((check_code, run_code), (1, 1));
    assert!(check_err.contains("unknown field `workers`"), "{check_err}");
    assert!(
        run_err.starts_with(check_err.trim_end()),
        "run: {run_err}\ncheck: {check_err}"
    );
    assert!(run_err.contains("refusing to start"), "{run_err}");
}

#[test]
fn missing_routes_file_is_a_clear_error() {
    let (code, _, err) = k2(&["check", "--routes", "/nonexistent/routes.toml"]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("/nonexistent/routes.toml: error: cannot read file"),
        "{err}"
    );
}

#[test]
fn unknown_flag_is_refused_by_the_cli() {
    let (code, _, err) = k2(&["run", "--route", "x.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("unexpected argument '--route'"), "{err}");
    let (code, _, err) = k2(&["run", "--log-format", "xml"]);
    assert_eq!(code, 2);
    assert!(err.contains("invalid value 'xml'"), "{err}");
}
