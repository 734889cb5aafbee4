//! The table the benchmark prints: a Markdown table ready for the README.

use std::fmt::Write;
use std::time::Duration;

use crate::Sizes;
use crate::support::RedisServer;

/// One line of the table.
pub struct Row {
    pub scenario: String,
    /// What cachepol achieved, formatted.
    pub cachepol: String,
    /// The baseline and how it was measured, formatted; `-` if none.
    pub baseline: String,
    /// cachepol relative to the baseline (or the measure the target is
    /// about), formatted.
    pub ratio: String,
    pub target: String,
    /// Whether the target was met, when it can be judged.
    pub met: Option<bool>,
}

/// Keys (or events) per second, readable.
pub fn rate(per_sec: f64) -> String {
    if per_sec >= 1e6 {
        format!("{:.2}M/s", per_sec / 1e6)
    } else if per_sec >= 1e3 {
        format!("{:.1}k/s", per_sec / 1e3)
    } else {
        format!("{per_sec:.0}/s")
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned()))
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn redis_version(redis: &RedisServer) -> String {
    let info: String = redis.cmd(&["INFO", "server"]);
    info.lines().find_map(|l| l.strip_prefix("redis_version:")).unwrap_or("?").trim().to_owned()
}

fn today() -> String {
    let out = std::process::Command::new("date").arg("-u").arg("+%Y-%m-%d").output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default()
}

pub fn render(redis: &RedisServer, sizes: &Sizes, rows: &[Row], took: Duration) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut out = String::new();
    let kind = if sizes.quick { "quick" } else { "full" };
    let _ = writeln!(
        out,
        "\ncachepol benchmark ({kind} run, {}): {cores} cores, {}, Redis {}; medians of {} repetition(s); took {:.0} s\n",
        today(),
        cpu_model(),
        redis_version(redis),
        sizes.reps,
        took.as_secs_f64()
    );
    let _ = writeln!(out, "| scenario | cachepol | baseline (same run) | ratio | target | met |");
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for r in rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "-",
        };
        let _ =
            writeln!(out, "| {} | {} | {} | {} | {} | {met} |", r.scenario, r.cachepol, r.baseline, r.ratio, r.target);
    }
    out
}
