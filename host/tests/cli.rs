//! The `cachepol` binary: `check` and `test` as a user runs them.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn cachepol(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cachepol")).args(args).output().expect("run cachepol")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn check_prints_the_manifest() {
    let wasm = common::policy("genre-invalidation");
    let out = cachepol(&["check", wasm.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("policy:      genre-invalidation"), "{text}");
    assert!(text.contains("keyspace   set on last_updated:*"), "{text}");
    assert!(text.contains("service_playlist:*:*"), "{text}");
}

/// Each kind of bad file gets one clear line and a non-zero exit.
#[test]
fn check_rejects_bad_files_with_one_clear_line() {
    let dir = tempdir();
    let good = std::fs::read(common::policy("genre-invalidation")).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "random.wasm",
            (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect(),
            "not a WebAssembly file",
        ),
        ("empty.wasm", Vec::new(), "the file is empty"),
        ("core.wasm", b"\0asm\x01\0\0\0".to_vec(), "a core WebAssembly module, not a component"),
        ("future.wasm", b"\0asm\x0e\0\x01\0".to_vec(), "unsupported WebAssembly binary version"),
    ];
    for (name, bytes, expected) in cases {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let out = cachepol(&["check", path.to_str().unwrap()]);
        assert_bad(&out, expected, name);
    }
    // A copy cut short says so, wherever the cut falls.
    for cut in [9, 12, 100, good.len() / 3, good.len() / 2, good.len() * 9 / 10, good.len() - 1] {
        let path = dir.join(format!("cut-{cut}.wasm"));
        std::fs::write(&path, &good[..cut]).unwrap();
        let out = cachepol(&["check", path.to_str().unwrap()]);
        assert_bad(&out, &format!("the file is truncated: {cut} bytes"), &format!("cut at {cut}"));
    }
    let other_world = common::fixture("not-a-policy");
    let out = cachepol(&["check", other_world.to_str().unwrap()]);
    assert_bad(&out, "does not implement the cachepol:policy/policy world (0.1.0 or 0.2.x)", "not-a-policy");
    let out = cachepol(&["check", dir.join("missing.wasm").to_str().unwrap()]);
    assert_bad(&out, "cannot read", "missing");
}

fn assert_bad(out: &Output, expected: &str, case: &str) {
    assert_eq!(out.status.code(), Some(1), "{case}");
    let err = stderr(out);
    assert!(err.starts_with("error: ") && err.contains(expected), "{case}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{case}: one line, got {err}");
}

#[test]
fn test_passes_bundled_scenarios_and_fails_a_wrong_one_with_a_diff() {
    let wasm = common::policy("genre-invalidation");
    let scenarios = common::workspace().join("policies/genre-invalidation/scenarios");
    let out = cachepol(&["test", wasm.to_str().unwrap(), scenarios.to_str().unwrap()]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains(" passed, 0 failed"));

    let dir = tempdir();
    let wrong = dir.join("wrong.toml");
    std::fs::write(
        &wrong,
        "description = \"claims rock is dropped\"\n[keys]\n\"graph_data:rock\" = \"g\"\n\
         [[steps]]\ndeploy = { tags = { genre = \"dance\" } }\n[expect]\nabsent = [\"graph_data:rock\"]\n",
    )
    .unwrap();
    let out = cachepol(&["test", wasm.to_str().unwrap(), wrong.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("FAIL") && text.contains("claims rock is dropped"), "{text}");
    assert!(text.contains("graph_data:rock: expected absent, but found \"g\""), "{text}");
    assert!(text.contains("0 passed, 1 failed"), "{text}");
}

#[test]
fn test_reports_a_malformed_scenario_file() {
    let wasm = common::policy("genre-invalidation");
    let dir = tempdir();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[expect]\nabsnt = [\"x\"]\n").unwrap();
    let out = cachepol(&["test", wasm.to_str().unwrap(), bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("unknown field `absnt`"), "{}", stdout(&out));
}

/// The path a new team takes: scaffold, then build, test and check the
/// crate exactly as generated.
#[test]
fn a_scaffolded_policy_builds_passes_its_scenario_and_checks() {
    let dir = tempdir();
    let krate = dir.join("session-ttl");
    let sdk = common::workspace().join("guest-sdk");
    let out = cachepol(&["new", "session-ttl", "--path", krate.to_str().unwrap(), "--sdk-path", sdk.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    for file in ["Cargo.toml", "src/lib.rs", "scenarios/ttl.toml", "README.md"] {
        assert!(krate.join(file).exists(), "{file}");
    }
    let manifest = std::fs::read_to_string(krate.join("Cargo.toml")).unwrap();
    assert!(manifest.contains("serde = {") && manifest.contains("panic = \"abort\""), "{manifest}");
    // The workspace's lock file: the same dependency versions, no network.
    std::fs::copy(common::workspace().join("Cargo.lock"), krate.join("Cargo.lock")).unwrap();
    // Its own target dir: the test's cargo holds the workspace's.
    let target = common::workspace().join("target/scaffold-test");
    let test = Command::new(env!("CARGO_BIN_EXE_cachepol"))
        .args(["test", krate.to_str().unwrap()])
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap();
    assert!(test.status.success(), "{}{}", stdout(&test), stderr(&test));
    assert!(stdout(&test).contains("1 passed, 0 failed"), "{}", stdout(&test));
    let wasm = target.join("wasm32-wasip2/release/session_ttl.wasm");
    let check = cachepol(&["check", wasm.to_str().unwrap()]);
    assert!(check.status.success(), "{}", stderr(&check));
    assert!(stdout(&check).contains("policy:      session-ttl"), "{}", stdout(&check));
    assert!(stdout(&check).contains("notify-keyspace-events: needs"), "{}", stdout(&check));
    // Nothing is overwritten.
    let again = cachepol(&["new", "session-ttl", "--path", krate.to_str().unwrap()]);
    assert!(!again.status.success() && stderr(&again).contains("already exists"), "{}", stderr(&again));
}

#[test]
fn help_shows_examples() {
    for sub in ["check", "test", "new"] {
        let out = cachepol(&[sub, "--help"]);
        assert!(out.status.success());
        assert!(stdout(&out).contains("Example"), "{sub}: {}", stdout(&out));
    }
}

fn tempdir() -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("cachepol-cli-{}-{:?}", std::process::id(), std::thread::current().id()));
    std::fs::create_dir_all(&dir).unwrap();
    assert!(Path::new(&dir).is_dir());
    dir
}
