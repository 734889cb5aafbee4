//! The `cachepol` binary: parse the arguments, set up logging, run one
//! subcommand (`cli/`), and turn its result into an exit status.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let log_writer = init_logging(cli.verbose, cli.log_format, cli.command.is_daemon());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(cli.command.run());
    // Flush the log before the last word, so it comes last.
    drop(log_writer);
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes, `: `-separated as `{:#}` shows them, but each
/// said once: a Redis error as Redis said it (`WRONGTYPE Operation ...`,
/// [`cachepol::store::redis::describe`]) without its source repeating it,
/// and a cause whose words the line already ends with left out.
fn chain(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let redis = cause.downcast_ref::<redis::RedisError>();
        let text = redis.map_or_else(|| cause.to_string(), cachepol::store::redis::describe);
        if !line.ends_with(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        if redis.is_some() {
            break;
        }
    }
    line
}

/// Log to stderr through a writer thread: a policy call that logs (every
/// audit line) must not wait for a `write` to the terminal or a pipe, and
/// lines are written in batches. Never lossy: when the writer falls far
/// behind, callers wait rather than drop audit lines. The guard flushes on
/// drop.
///
/// At `-v` the daemon also logs every policy call that changed nothing
/// (`cachepol::audit` at debug), to see a policy at work.
fn init_logging(verbose: u8, format: cli::LogFormat, daemon: bool) -> tracing_appender::non_blocking::WorkerGuard {
    let default = match (verbose, daemon) {
        (0, false) => "error",
        (0, true) => "info",
        (1, false) => "info",
        (1, true) => "info,cachepol::audit=debug",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    match format {
        cli::LogFormat::Text => logs.with_ansi(ansi).init(),
        // One JSON object per line, with the fields of the event and of
        // every span it is in (policy, event, deploy entry).
        cli::LogFormat::Json => logs.json().flatten_event(true).with_current_span(true).with_span_list(true).init(),
    }
    guard
}
