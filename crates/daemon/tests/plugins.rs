//! Engines loaded from dynamic libraries, with real processes: the example
//! quota plugin added to a running daemon acts on mediated calls and keeps
//! its counts across upgrades to new builds; libraries that are not
//! plugins, or plugins built for another ABI, are refused with errors that
//! name them.
//!
//! The libraries are this package's dev-dependencies (cdylibs, so never
//! linked): cargo builds them into the directory of the test binary
//! (`target/<profile>/deps`) before any test runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use shmesh::control::{PolicyAnswer, PolicyRequest};
use shmesh::status::Code;

/// The entry point of child processes (see [`common::run_child`]).
#[test]
#[ignore = "run as a child process by the other tests"]
fn child() {
    run_child();
}

/// A library cargo built beside this test binary.
fn built(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().join(format!("lib{name}.so"));
    assert!(
        path.exists(),
        "{} is missing: it is built as a dev-dependency of shmesh-daemon",
        path.display()
    );
    path
}

/// Installs a build of the example plugin at `dir/name`, as a new file.
/// `build` tells builds apart: the file is the library with that many
/// bytes appended (which the loader ignores), so two builds never look
/// like the same file.
fn install(dir: &Path, name: &str, build: usize) -> PathBuf {
    let mut bytes = std::fs::read(built("shmesh_example_engine_plugin")).unwrap();
    bytes.extend(std::iter::repeat_n(0u8, build));
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn toml_path(path: &Path) -> String {
    toml::Value::String(path.display().to_string()).to_string()
}

/// The quota plugin at `path`, allowing `calls` calls of `ECHO`.
fn quota(path: &Path, calls: u32) -> String {
    format!(
        "name = \"quota\"\nkind = \"plugin\"\nservice = \"echo\"\npath = {}\nconfig = {{ methods = [{{ method = {ECHO}, calls = {calls} }}] }}\n",
        toml_path(path)
    )
}

fn policy(daemon: &Daemon, request: PolicyRequest) -> PolicyAnswer {
    shmesh_daemon::query_policy(&daemon.address(), request).unwrap()
}

fn add(daemon: &Daemon, spec: String) -> PolicyAnswer {
    policy(
        daemon,
        PolicyRequest::Add {
            spec,
            position: None,
        },
    )
}

fn upgrade(daemon: &Daemon, spec: String) -> PolicyAnswer {
    policy(
        daemon,
        PolicyRequest::Upgrade {
            name: "quota".into(),
            spec,
        },
    )
}

/// The error of a refused request, which must name `path`.
fn refusal(answer: PolicyAnswer, path: &str) -> String {
    let error = answer.error.expect("the request is refused");
    assert!(error.contains(path), "the error names {path}: {error}");
    eprintln!("refused as it should be: {error}");
    error
}

fn over_quota(status: shmesh::status::Status) -> bool {
    status.code() == Code::ResourceExhausted && status.message().contains("quota")
}

#[test]
fn a_plugin_engine_limits_calls_and_keeps_its_counts_across_upgrades_to_new_builds() {
    let _serial = serial();
    let dir = scratch("plugin");
    let config = dir.join("shmeshd.toml");
    std::fs::write(
        &config,
        "[[services]]\nname = \"echo\"\npath = \"mediated\"\n",
    )
    .unwrap();
    let daemon = Daemon::start(&dir.join("d.sock"), Some(&config));
    let _replica = spawn_child("replica", &daemon, "echo");
    daemon.wait_for("the replica", |r| replicas(r, "echo") == 1);
    let channel = connect(&daemon, "echo");

    // Build 1, three calls of ECHO allowed.
    let build1 = install(&dir, "quota-1.so", 1);
    let answer = add(&daemon, quota(&build1, 3));
    assert_eq!(answer.error, None);
    assert_eq!(answer.engines.len(), 1);
    assert_eq!(answer.engines[0].kind, "plugin:quota");
    assert_eq!(answer.engines[0].service, "echo");
    for n in 0..3 {
        let body = format!("call {n}");
        assert_eq!(echo(&channel, body.as_bytes()).unwrap(), body.as_bytes());
    }
    let refused = echo(&channel, b"one too many").unwrap_err();
    assert!(over_quota(refused.clone()), "{refused}");
    assert!(
        refused
            .message()
            .contains("the 3 calls of method 1 of echo"),
        "{refused}"
    );
    // Another method has no quota.
    let other = channel
        .call(ECHO_TOO, b"free", Some(std::time::Duration::from_secs(10)))
        .unwrap();
    assert_eq!(&other[..], b"free");
    let listed = policy(&daemon, PolicyRequest::List);
    assert!(
        listed.engines[0]
            .description
            .starts_with("3 calls admitted, 1 over quota"),
        "{listed:?}"
    );

    // Build 2, at its own path, with five calls: the three made count.
    let build2 = install(&dir, "quota-2.so", 2);
    assert_eq!(upgrade(&daemon, quota(&build2, 5)).error, None);
    for _ in 0..2 {
        assert_eq!(echo(&channel, b"more").unwrap(), b"more");
    }
    let refused = echo(&channel, b"again too many").unwrap_err();
    assert!(over_quota(refused.clone()), "{refused}");
    assert!(refused.message().contains("the 5 calls"), "{refused}");

    // Back to build 1 (loaded already, so shared): the counts go along.
    assert_eq!(upgrade(&daemon, quota(&build1, 5)).error, None);
    assert!(over_quota(echo(&channel, b"still").unwrap_err()));
    let listed = policy(&daemon, PolicyRequest::List);
    assert!(
        listed.engines[0]
            .description
            .starts_with("5 calls admitted, 3 over quota"),
        "{listed:?}"
    );

    // A file replaced at a path loaded before is refused (the loader would
    // hand back the library it has), and the running engine stays.
    let replaced = install(&dir, "quota-2.so", 3);
    let error = refusal(
        upgrade(&daemon, quota(&replaced, 5)),
        &replaced.display().to_string(),
    );
    assert!(
        error.contains("changed since the daemon loaded it"),
        "{error}"
    );
    // A built-in engine cannot take the plugin's state.
    let answer = upgrade(
        &daemon,
        "kind = \"rate-limit\"\nrate = 1.0\nburst = 1\n".into(),
    );
    let error = answer.error.unwrap();
    assert!(
        error.contains("state of a plugin:quota engine into a rate-limit engine"),
        "{error}"
    );
    assert_eq!(answer.engines[0].kind, "plugin:quota");
    assert!(over_quota(echo(&channel, b"still").unwrap_err()));

    // Removed: calls pass again.
    let answer = policy(
        &daemon,
        PolicyRequest::Remove {
            name: "quota".into(),
        },
    );
    assert_eq!(answer.error, None);
    assert_eq!(echo(&channel, b"free again").unwrap(), b"free again");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A shared library the daemon has mapped anyway (the C library): a
/// library, but not a plugin.
fn libc_path() -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| {
            path.rsplit('/')
                .next()
                .is_some_and(|file| file.starts_with("libc.so") || file.starts_with("libc-"))
        })
        .expect("this test binary maps the C library")
        .to_owned()
}

#[test]
fn libraries_that_are_not_plugins_for_this_abi_are_refused_naming_them() {
    let _serial = serial();
    let dir = scratch("notplugins");
    let daemon = Daemon::start(&dir.join("d.sock"), None);
    let spec = |path: &str, config: &str| {
        format!(
            "name = \"quota\"\nkind = \"plugin\"\npath = {}\nconfig = {{ {config} }}\n",
            toml::Value::String(path.to_owned())
        )
    };
    let plugin = |path: &Path| spec(&path.display().to_string(), "default_calls = 1");

    let missing = dir.join("libmissing.so");
    let error = refusal(
        add(&daemon, plugin(&missing)),
        &missing.display().to_string(),
    );
    assert!(error.contains("cannot read it"), "{error}");

    let error = refusal(add(&daemon, spec("libquota.so", "")), "libquota.so");
    assert!(error.contains("must be absolute"), "{error}");

    let junk = dir.join("libjunk.so");
    std::fs::write(&junk, "not a library").unwrap();
    let error = refusal(add(&daemon, plugin(&junk)), &junk.display().to_string());
    assert!(error.contains("cannot load it as a library"), "{error}");

    let libc = libc_path();
    let error = refusal(add(&daemon, spec(&libc, "")), &libc);
    assert!(error.contains("not a shmesh engine plugin"), "{error}");

    let old = built("shmesh_test_plugin_old_abi");
    let error = refusal(add(&daemon, plugin(&old)), &old.display().to_string());
    assert!(
        error.contains("built for engine ABI 0.9.0; this daemon loads engine ABI 1.0.0"),
        "{error}"
    );
    // Asked again, the same file gets the same answer (it stays loaded).
    let again = refusal(add(&daemon, plugin(&old)), &old.display().to_string());
    assert_eq!(again, error);

    let other = built("shmesh_test_plugin_other_layout");
    let error = refusal(add(&daemon, plugin(&other)), &other.display().to_string());
    assert!(
        error.contains("does not have the layout of engine ABI 1.0.0"),
        "{error}"
    );

    // A real plugin that refuses its config says why.
    let build = install(&dir, "quota.so", 0);
    let error = refusal(
        add(&daemon, spec(&build.display().to_string(), "speed = 2")),
        &build.display().to_string(),
    );
    assert!(
        error.contains("refused to start its engine") && error.contains("speed"),
        "{error}"
    );

    // None of it got in; and the daemon still loads a good plugin.
    assert!(policy(&daemon, PolicyRequest::List).engines.is_empty());
    let answer = add(&daemon, plugin(&build));
    assert_eq!(answer.error, None);
    assert_eq!(answer.engines[0].kind, "plugin:quota");
    let _ = std::fs::remove_dir_all(&dir);
}
