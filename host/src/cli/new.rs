//! `cachepol new NAME`: scaffold a policy crate that builds, checks and
//! passes its own scenario as generated.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;

pub const AFTER_HELP: &str = "Examples:
  cachepol new session-ttl
  cachepol new session-ttl --path ~/src/session-ttl
  cachepol new session-ttl --sdk-path ../cachepol/guest-sdk     # the SDK from a checkout of cachepol

Writes Cargo.toml (a cdylib depending on cachepol-guest-sdk and serde, with the small release
profile), src/lib.rs (a typed config, on_key and on_sweep), scenarios/ttl.toml and a README.
The SDK comes from the checkout this cachepol was built from when it is still there, else by
version (with the path form commented). Then: cd NAME && cachepol test .";

#[derive(Args)]
pub struct NewArgs {
    /// The policy's name: lowercase letters, digits and `-` (as in its manifest).
    name: String,
    /// Where to create the crate (default: ./NAME).
    #[arg(long)]
    path: Option<PathBuf>,
    /// Depend on the SDK at this path instead of by version.
    #[arg(long)]
    sdk_path: Option<PathBuf>,
}

const CARGO_TOML: &str = include_str!("templates/Cargo.toml.tmpl");
const LIB_RS: &str = include_str!("templates/lib.rs.tmpl");
const SCENARIO: &str = include_str!("templates/scenario.toml.tmpl");
const README: &str = include_str!("templates/README.md.tmpl");

pub async fn run(args: NewArgs) -> Result<ExitCode> {
    check_name(&args.name)?;
    let dir = args.path.clone().unwrap_or_else(|| PathBuf::from(&args.name));
    if dir.exists() && std::fs::read_dir(&dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("{} already exists and is not empty", dir.display());
    }
    // cachepol is built from source today: the SDK beside its sources is
    // the one it speaks to (and it is not on crates.io yet).
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk");
    let sdk_path = args.sdk_path.clone().or_else(|| checkout.join("Cargo.toml").exists().then_some(checkout));
    let sdk = match &sdk_path {
        Some(path) => {
            let path = std::fs::canonicalize(path).with_context(|| format!("no SDK at {}", path.display()))?;
            if !path.join("Cargo.toml").exists() {
                bail!("{} is not the cachepol-guest-sdk crate (no Cargo.toml)", path.display());
            }
            format!(
                "cachepol-guest-sdk = {{ path = {:?} }}\n# Once it is published:\n# cachepol-guest-sdk = \"{}\"",
                path.display().to_string(),
                env!("CARGO_PKG_VERSION")
            )
        }
        None => format!(
            "cachepol-guest-sdk = \"{}\"\n# Or, from a checkout of cachepol:\n# cachepol-guest-sdk = {{ path = \"../cachepol/guest-sdk\" }}",
            env!("CARGO_PKG_VERSION")
        ),
    };
    let fill = |template: &str| {
        template
            .replace("@NAME@", &args.name)
            .replace("@TYPE@", &type_name(&args.name))
            .replace("@FILE@", &args.name.replace('-', "_"))
            .replace("@SDK@", &sdk)
    };
    write(&dir.join("Cargo.toml"), &fill(CARGO_TOML))?;
    write(&dir.join("src/lib.rs"), &fill(LIB_RS))?;
    write(&dir.join("scenarios/ttl.toml"), &fill(SCENARIO))?;
    write(&dir.join("README.md"), &fill(README))?;
    write(&dir.join(".gitignore"), "/target\n")?;
    println!("created policy `{}` in {}", args.name, dir.display());
    match &sdk_path {
        Some(path) => println!("the SDK: {}", path.display()),
        None => println!(
            "the SDK by version: if cargo cannot find cachepol-guest-sdk, point Cargo.toml at a checkout (see the comment there, or --sdk-path)"
        ),
    }
    println!("next: cd {} && cachepol test .", dir.display());
    Ok(ExitCode::SUCCESS)
}

/// Names cargo or Rust refuse as a crate, or whose type name would clash
/// with the template's or the SDK prelude's.
const RESERVED: &[&str] = &[
    "test",
    "core",
    "std",
    "alloc",
    "proc-macro",
    "self",
    "super",
    "crate",
    "build",
    "deps",
    "examples",
    "incremental",
    "config",
    "policy",
    "error",
    "outcome",
    "manifest",
    "event",
    "key-event",
    "deploy-event",
    "key-ops",
    "glob",
    "template",
    "no-config",
    "sweep-reason",
    "expire-condition",
    "expire-row",
    "set-options",
    "set-condition",
];

/// The manifest's rule for names, checked now rather than at first load.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        bail!("`{name}` is not a policy name: 1 to 64 lowercase letters, digits and `-`, starting with a letter");
    }
    if RESERVED.contains(&name) {
        bail!("`{name}` would not build as a crate here (a name Rust, cargo or the SDK uses): pick another");
    }
    Ok(())
}

/// `session-ttl` -> `SessionTtl`.
fn type_name(name: &str) -> String {
    name.split('-')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map(|c| c.to_ascii_uppercase()).into_iter().chain(chars).collect::<String>()
        })
        .collect()
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_manifest_rule_and_make_type_names() {
        assert!(check_name("session-ttl").is_ok());
        for bad in ["", "Session", "1st", "a_b", "a.b", "test", "config"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(type_name("session-ttl"), "SessionTtl");
        assert_eq!(type_name("a2-b"), "A2B");
    }
}
