//! `cachepol test`: run scenario files against a policy on the fake host.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result, bail};
use cachepol::fake::scenario::{self, Scenario};
use cachepol::sandbox::runtime::{Runtime, RuntimeConfig};
use clap::Args;

pub const AFTER_HELP: &str = r#"Examples:
  cachepol test .                                   # a policy crate: build it for wasm32-wasip2, run scenarios/
  cachepol test policies/genre-invalidation.wasm policies/genre-invalidation/scenarios/
  cachepol test my-policy.wasm deploy.toml sweep.json

A scenario (TOML or JSON) gives config, starting keys, steps and expectations:
  description = "a deploy tagged genre=dance drops dance's keys"
  [config]
  keys = ["graph_data:{genre}"]
  [keys]
  "graph_data:dance" = "g"
  "service_playlist:dance:1" = { value = "p", ttl = 900 }
  "queue:1" = { list = ["a", "b"] }          # also { hash = {..} }, { set = [..] }, { zset = {m = 1} }
  [[steps]]
  deploy = { service = "catalog", tags = { genre = "dance" } }
  [expect]
  absent = ["graph_data:dance"]

Top level: description, config, budgets, grants (the operator's narrowing), load_error (loading
must fail with this text), keys, steps, expect.
Steps (one per [[steps]]; writes emit the keyspace events Redis would):
  set = { key, value, ttl }        del = [keys]            expire = { key, ttl }    persist = "key"
  rpush/lpush = { key, values }    lpop/rpop = { key, count }
  hset = { key, fields = {f = v} } hdel = { key, fields = [f] }
  sadd/srem = { key, members }     zadd = { key, members = {m = score} }   zrem = { key, members }
  advance = seconds                sweep = "start|reconnect|gap|periodic|manual|reload"
  deploy = { service, files, tags = {k = v} or ["k=v"] }   event = { op, key }   expect = {..}
  unnoticed = [{ set = {..} }, { del = [..] }, ...]   writes whose events are lost (the daemon away)
Expectations ([expect] and expect steps): present, absent, none_matching, keys (exactly these),
values, lists, hashes, sets, zsets, ttl ({ key = [min, max] } or "persistent"), denials
([{ op, target }], none unless listed), failures (0 unless given).
Times are seconds. Full reference: guest-sdk/docs/scenarios.md in the cachepol repository.
Exit status: 0 if every scenario passed, 1 otherwise."#;

#[derive(Args)]
pub struct TestArgs {
    /// The policy's .wasm component, or its crate's directory (built first).
    policy: PathBuf,
    /// Scenario files, or directories of them (default for a crate: its scenarios/).
    scenarios: Vec<PathBuf>,
}

/// Run every scenario, print `ok`/`FAIL` per file and a summary line.
pub async fn run(mut args: TestArgs) -> Result<ExitCode> {
    if args.policy.is_dir() {
        let dir = args.policy.clone();
        args.policy = build_crate(&dir)?;
        if args.scenarios.is_empty() {
            args.scenarios.push(dir.join("scenarios"));
        }
    } else if args.scenarios.is_empty() {
        bail!("give scenario files or directories after the .wasm (or give the policy's crate directory)");
    }
    let files = scenario::collect_files(&args.scenarios)?;
    if files.is_empty() {
        bail!(
            "no scenario files (*.toml, *.json) in {}",
            args.scenarios.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let policy = &args.policy;
    let compiled = runtime.compile_file(policy).with_context(|| policy.display().to_string())?;
    let (mut passed, mut failed) = (0, 0);
    for file in &files {
        let scenario = match Scenario::from_file(file) {
            Ok(s) => s,
            Err(e) => {
                println!("FAIL {}\n  {e}", file.display());
                failed += 1;
                continue;
            }
        };
        let report = scenario::run(&runtime, &compiled, &scenario).await;
        let what = if report.description.is_empty() { String::new() } else { format!(": {}", report.description) };
        if report.passed() {
            passed += 1;
            println!("ok   {}{what}", file.display());
        } else {
            failed += 1;
            println!("FAIL {}{what}\n{report}", file.display());
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `cargo build --release --target wasm32-wasip2` of the crate in `dir`;
/// returns the component it built.
fn build_crate(dir: &Path) -> Result<PathBuf> {
    let manifest = dir.join("Cargo.toml");
    if !manifest.exists() {
        bail!("{} is a directory without a Cargo.toml: give a policy crate or a .wasm file", dir.display());
    }
    let manifest = std::fs::canonicalize(&manifest).with_context(|| manifest.display().to_string())?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building {} for {WASM_TARGET}", dir.display());
    // From the crate's directory: its rust-toolchain.toml and
    // .cargo/config.toml apply, as they would to `cargo build` there.
    let out = Command::new(&cargo)
        .args(["build", "--release", "--target", WASM_TARGET, "--message-format=json-render-diagnostics"])
        .arg("--manifest-path")
        .arg(&manifest)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", cargo.to_string_lossy()))?;
    if !out.status.success() {
        bail!(
            "the build failed (see above); if it says the {WASM_TARGET} target is missing: rustup target add {WASM_TARGET}"
        );
    }
    let built: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        // The crate's own cdylib, not a dependency built as one too.
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter(|m| m["manifest_path"].as_str().is_some_and(|p| Path::new(p) == manifest))
        .filter(|m| m["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "cdylib")))
        .flat_map(|m| m["filenames"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f.as_str().map(PathBuf::from))
        .filter(|f| f.extension().is_some_and(|e| e == "wasm"))
        .collect();
    match built.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("{} built no .wasm: is its [lib] crate-type \"cdylib\"?", dir.display()),
        many => bail!("{} built several components ({}); give the .wasm to test", dir.display(), many.len()),
    }
}

/// What policies are built for.
const WASM_TARGET: &str = "wasm32-wasip2";
