//! The `cachepol` binary: parse the arguments, set up logging, run one
//! subcommand (`cli/`), and turn its result into an exit status.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let log_writer = init_logging(cli.verbose, cli.command.is_daemon());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(cli.command.run());
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
