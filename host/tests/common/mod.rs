//! Shared helpers for the host's integration tests: where the built
//! components are, and a runtime to load them in.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use cachepol::sandbox::runtime::{Compiled, Runtime, RuntimeConfig};

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn built(path: PathBuf) -> PathBuf {
    assert!(path.exists(), "{} is missing: run `cargo xtask build-policies` first", path.display());
    path
}

/// A bundled policy's component, `policies/<name>.wasm`.
pub fn policy(name: &str) -> PathBuf {
    built(workspace().join("policies").join(format!("{name}.wasm")))
}

/// A test fixture's component, `tests/fixtures/<name>.wasm`.
pub fn fixture(name: &str) -> PathBuf {
    built(workspace().join("tests/fixtures").join(format!("{name}.wasm")))
}

pub fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig::default()).expect("runtime")
}

pub fn compile(runtime: &Runtime, path: &Path) -> Compiled {
    runtime.compile_file(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
