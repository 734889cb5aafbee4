//! The `cachepol` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use cachepol::config::Config;
use cachepol::daemon;
use cachepol::fake::FakeRedis;
use cachepol::runtime::{LoadOptions, Runtime, RuntimeConfig};
use cachepol::scenario::{self, Scenario};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "cachepol", version, about = "Cache policies as sandboxed WebAssembly components next to Redis")]
struct Cli {
    /// More log output (-v: info, -vv: debug). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: load the policies and feed them Redis events and deploy hooks.
    #[command(after_help = "Examples:
  cachepol run                                   # redis://127.0.0.1:6379, ./policies
  REDIS_URL=redis://:secret@cache:6379/2 cachepol run --config /etc/cachepol.toml
  cachepol run --configure-notifications --policies /srv/cachepol/policies

Settings come from the config file (see README), then flags and REDIS_URL override them.
Policies hot-reload: replace a file atomically (cp new.wasm policies/.x.tmp && mv policies/.x.tmp
policies/x.wasm), delete one to unload it; SIGHUP re-scans the directory.
Stop with SIGINT or SIGTERM: in-flight calls finish, handled deploy hooks are acknowledged.")]
    Run(RunArgs),
    /// Publish a deploy hook to the deploy stream and print its id.
    #[command(after_help = "Examples:
  cachepol deploy --service quiz --file quiz_generator.py
  cachepol deploy --service catalog --tag genre=dance --tag genre=rock
  REDIS_URL=redis://cache:6379 cachepol deploy --service web --file app.py --id release-2024-05-01")]
    Deploy(DeployArgs),
    /// Validate a policy component and print its manifest.
    #[command(after_help = "Examples:
  cachepol check policies/genre-invalidation.wasm
  cachepol check policies/genre-invalidation.wasm --config '{\"keys\": [\"graph:{genre}\"]}'
  cachepol check policies/genre-invalidation.wasm --config @genre.json")]
    Check {
        /// The policy's .wasm component.
        policy: PathBuf,
        /// The policy's config: JSON text, or @FILE to read it from a file.
        #[arg(long, default_value = "{}")]
        config: String,
    },
    /// Disable a policy in every daemon on this Redis, without touching files (the kill switch).
    #[command(after_help = "Examples:
  cachepol disable file-cache-clear
  REDIS_URL=redis://cache:6379 cachepol disable ttl-table

Adds NAME to the Redis Set `cachepol:control:disabled` (config: control_key); running daemons
read it every second and confirm in their log. A disabled policy gets no events; its deploy
hooks are retried, then dead-lettered. `cachepol enable NAME` undoes it (and sweeps the policy).")]
    Disable(SwitchArgs),
    /// Enable a policy disabled with `cachepol disable`.
    Enable(SwitchArgs),
    /// Print the Redis ACL rule that gives the daemon exactly what its policies need.
    #[command(after_help = "Examples:
  cachepol acl --redis-url redis://cachepol:s3cret@cache:6379 --policies /srv/cachepol/policies
  cachepol acl --config /etc/cachepol.toml | redis-cli -h cache --user default --pass ...

Loads every policy in the directory with its config section (as `cachepol run` would) and prints
one `ACL SETUSER` line: the commands the daemon sends and no others, each grant's key pattern
(read-only, write-only or both), the deploy streams and the keyspace-notification channel.
The user and password come from the Redis URL (or --user/--password). Run the daemon as that user.")]
    Acl(AclArgs),
    /// Run scenario files against a policy on the fake host.
    #[command(after_help = "Examples:
  cachepol test policies/genre-invalidation.wasm policies/genre-invalidation/scenarios/
  cachepol test my-policy.wasm deploy.toml sweep.json

A scenario (TOML or JSON) gives config, starting keys, steps and expectations:
  [keys]
  \"graph_data:dance\" = \"g\"
  \"service_playlist:dance:1\" = { value = \"p\", ttl = 900 }
  [[steps]]
  deploy = { service = \"catalog\", tags = { genre = \"dance\" } }
  [expect]
  absent = [\"graph_data:dance\"]
  none_matching = [\"service_playlist:dance:*\"]

Steps: set, del, expire, persist, advance (seconds), deploy, sweep, event, expect.
Expectations: present, absent, none_matching, values, ttl ([min, max] or \"persistent\"),
keys (the exact keyspace), denials and failures (none unless listed).
Exit status: 0 if every scenario passed, 1 otherwise.")]
    Test {
        /// The policy's .wasm component.
        policy: PathBuf,
        /// Scenario files, or directories of them.
        #[arg(required = true)]
        scenarios: Vec<PathBuf>,
    },
}

/// What decides the loaded policy set: shared by `run` and `acl`, so that
/// `acl` describes exactly what `run` will load.
#[derive(Args)]
struct PolicySetArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Directory of policy .wasm files.
    #[arg(long)]
    policies: Option<PathBuf>,
    /// The daemon sets notify-keyspace-events to what the policies need (instead of refusing
    /// to start without them).
    #[arg(long)]
    configure_notifications: bool,
}

impl PolicySetArgs {
    fn load(&self) -> Result<Config> {
        let mut config = self.common.load()?;
        if let Some(dir) = &self.policies {
            config.policies_dir = dir.clone();
        }
        config.configure_notifications |= self.configure_notifications;
        Ok(config)
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    set: PolicySetArgs,
    /// Do not watch the policies directory (immutable deployments); SIGHUP still reloads.
    #[arg(long)]
    no_watch: bool,
    /// Where compiled policies are cached.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Events queued per policy before coalescing and dropping (then a gap sweep).
    #[arg(long)]
    queue_capacity: Option<usize>,
    /// Longest chain of policies waking each other through their writes.
    #[arg(long)]
    hop_limit: Option<u8>,
}

#[derive(Args)]
struct AclArgs {
    #[command(flatten)]
    set: PolicySetArgs,
    /// The ACL user (default: the Redis URL's user, else `cachepol`).
    #[arg(long)]
    user: Option<String>,
    /// The user's password (default: the Redis URL's password).
    #[arg(long)]
    password: Option<String>,
}

#[derive(Args)]
struct SwitchArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The policy's name (as in its manifest and the daemon's log).
    name: String,
}

#[derive(Args)]
struct DeployArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The service that was deployed.
    #[arg(long)]
    service: String,
    /// A changed file (repeatable).
    #[arg(long = "file")]
    files: Vec<String>,
    /// A tag, name=value (repeatable).
    #[arg(long = "tag", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// The hook's id (default: the stream entry id).
    #[arg(long)]
    id: Option<String>,
}

/// Settings shared by the commands that talk to Redis.
#[derive(Args)]
struct CommonArgs {
    /// Config file (cachepol.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Redis to use (overrides the config file).
    #[arg(long, env = "REDIS_URL")]
    redis_url: Option<String>,
    /// The deploy-hook stream (overrides the config file).
    #[arg(long)]
    deploy_stream: Option<String>,
}

impl CommonArgs {
    fn load(&self) -> Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(url) = &self.redis_url {
            config.redis_url = url.clone();
        }
        if let Some(stream) = &self.deploy_stream {
            config.deploy.stream = stream.clone();
        }
        Ok(config)
    }
}

fn parse_tag(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{text:?} is not name=value")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_writer = init_logging(cli.verbose, matches!(cli.command, Command::Run(_)));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(run(cli.command));
    // Flush the log before the last word, so it comes last.
    drop(log_writer);
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Log to stderr through a writer thread: a policy call that logs (every
/// audit line) must not wait for a `write` to the terminal or a pipe, and
/// lines are written in batches. Never lossy: when the writer falls far
/// behind, callers wait rather than drop audit lines. The guard flushes on
/// drop.
fn init_logging(verbose: u8, daemon: bool) -> tracing_appender::non_blocking::WorkerGuard {
    let default = match (verbose, daemon) {
        (0, false) => "error",
        (0, true) | (1, _) => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::BufWriter::new(std::io::stderr()));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi).init();
    guard
}

async fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run(args) => run_daemon(args).await,
        Command::Deploy(args) => deploy(args).await,
        Command::Acl(args) => acl(args).await,
        Command::Disable(args) => switch(args, true).await,
        Command::Enable(args) => switch(args, false).await,
        Command::Check { policy, config } => check(&policy, &config).await,
        Command::Test { policy, scenarios } => test(&policy, &scenarios).await,
    }
}

fn read_config(config: &str) -> Result<String> {
    let text = match config.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("cannot read config file {path}"))?,
        None => config.to_owned(),
    };
    serde_json::from_str::<serde_json::Value>(&text).context("--config is not valid JSON")?;
    Ok(text)
}

async fn check(path: &Path, config: &str) -> Result<ExitCode> {
    let config = read_config(config)?;
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let compiled = runtime.compile_file(path).with_context(|| path.display().to_string())?;
    let backend = Arc::new(FakeRedis::new().client("check"));
    let label = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let options = LoadOptions { label, config, ..LoadOptions::default() };
    let policy = runtime.load(&compiled, backend, &options).await.with_context(|| path.display().to_string())?;
    print!("{}", policy.manifest());
    Ok(ExitCode::SUCCESS)
}

/// `cachepol disable` / `cachepol enable`.
async fn switch(args: SwitchArgs, disable: bool) -> Result<ExitCode> {
    let config = args.common.load()?;
    let mut conn = connect(&config.redis_url).await?;
    let command = if disable { "SADD" } else { "SREM" };
    let changed: i64 = redis::cmd(command)
        .arg(&config.control_key)
        .arg(&args.name)
        .query_async(&mut conn)
        .await
        .with_context(|| format!("cannot update {}", config.control_key))?;
    let state = if disable { "disabled" } else { "enabled" };
    let already = if changed == 0 { " (it already was)" } else { "" };
    println!("{} {state}{already}; running daemons confirm in their log within a second", args.name);
    Ok(ExitCode::SUCCESS)
}

async fn connect(url: &str) -> Result<redis::aio::ConnectionManager> {
    let client = redis::Client::open(url).context("invalid Redis URL")?;
    redis::aio::ConnectionManager::new(client).await.with_context(|| format!("cannot connect to {url}"))
}

async fn acl(args: AclArgs) -> Result<ExitCode> {
    let config = args.set.load()?;
    let client = redis::Client::open(config.redis_url.as_str()).context("invalid Redis URL")?;
    let settings = client.get_connection_info().redis_settings();
    let user = args.user.or_else(|| settings.username().map(str::to_owned)).unwrap_or_else(|| "cachepol".into());
    let Some(password) = args.password.or_else(|| settings.password().map(str::to_owned)) else {
        bail!("no password: give --password, or a Redis URL with one (redis://{user}:PASSWORD@host)");
    };
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let backend = Arc::new(FakeRedis::new().client("acl"));
    let mut grants = Vec::new();
    let files = cachepol::reload::policy_files(&config.policies_dir)
        .with_context(|| format!("cannot list {}", config.policies_dir.display()))?;
    for path in &files {
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let section = config.policy(&stem);
        let options = config.load_options(&stem, &section);
        let compiled = runtime.compile_file(path).with_context(|| path.display().to_string())?;
        let policy =
            runtime.load(&compiled, backend.clone(), &options).await.with_context(|| path.display().to_string())?;
        grants.extend(policy.grants().rules().iter().map(|r| (r.pattern.as_str().to_owned(), r.ops)));
    }
    let request = cachepol::acl::AclRequest {
        user: &user,
        password: &password,
        db: u32::try_from(settings.db()).unwrap_or(0),
        deploy: &config.deploy,
        control_key: &config.control_key,
        configure_notifications: config.configure_notifications,
        grants,
    };
    println!("{}", cachepol::acl::render(&cachepol::acl::setuser_args(&request)));
    Ok(ExitCode::SUCCESS)
}

async fn test(policy: &Path, paths: &[PathBuf]) -> Result<ExitCode> {
    let files = scenario::collect_files(paths)?;
    if files.is_empty() {
        bail!(
            "no scenario files (*.toml, *.json) in {}",
            paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    let runtime = Runtime::new(RuntimeConfig::default())?;
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

async fn run_daemon(args: RunArgs) -> Result<ExitCode> {
    let mut config = args.set.load()?;
    config.watch &= !args.no_watch;
    if let Some(dir) = args.cache_dir {
        config.cache_dir = dir;
    }
    if let Some(n) = args.queue_capacity {
        config.queue_capacity = n.max(1);
    }
    if let Some(n) = args.hop_limit {
        config.hop_limit = n;
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    daemon::run(config, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// Cancel `shutdown` on SIGINT or SIGTERM.
async fn stop_on_signal(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
    shutdown.cancel();
}

async fn deploy(args: DeployArgs) -> Result<ExitCode> {
    let config = args.common.load()?;
    let mut conn = connect(&config.redis_url).await?;
    let id = cachepol::deploy::publish(
        &mut conn,
        &config.deploy.stream,
        &args.service,
        &args.files,
        &args.tags,
        args.id.as_deref(),
    )
    .await
    .context("cannot publish the deploy hook")?;
    println!("{id}");
    Ok(ExitCode::SUCCESS)
}
