//! Hot swap: from the rename that installs a new version to the first event
//! that version handles, through the running daemon (release build).
//!
//! The recorder fixture marks each key it sees with its build stamp; a probe
//! writes a fresh key every millisecond or so until one comes back marked by
//! the new stamp. Cold: a stamp the daemon has never compiled. Warm: a
//! stamp whose compiled code is in the compile cache (installed before).

use std::time::{Duration, Instant};

use crate::report::Row;
use crate::support::{Daemon, RedisServer, Setup, TempDir, install, stamped};
use crate::{Sizes, median};

const CONFIG: &str = "[policies.rec]\nconfig = { name = \"rec\", patterns = [\"swap:*\"], mark_prefix = \"mark:\" }";

/// Install stamp `n` and return the ms until it handled an event.
fn swap_to(redis: &RedisServer, setup: &Setup, n: u32, probe: &mut u64) -> f64 {
    let want = format!("{n:08}");
    let started = Instant::now();
    install(&setup.policies(), "rec", &stamped(n));
    let mut conn = redis.conn();
    loop {
        assert!(started.elapsed() < Duration::from_secs(30), "stamp {n} never went live");
        *probe += 1;
        let key = format!("swap:{probe}");
        redis::cmd("SET").arg(&key).arg("v").query::<()>(&mut conn).unwrap();
        let mark = format!("mark:{key}");
        let handled_by = loop {
            if let Some(v) = redis::cmd("GET").arg(&mark).query::<Option<String>>(&mut conn).unwrap() {
                break v;
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        if handled_by == want {
            return started.elapsed().as_secs_f64() * 1000.0;
        }
    }
}

pub fn run(redis: &RedisServer, sizes: &Sizes) -> Vec<Row> {
    let cache = TempDir::new("bench-cache");
    let setup = Setup::new(&[]).config(&format!("cache_dir = {:?}", cache.path())).config(CONFIG);
    install(&setup.policies(), "rec", &stamped(1));
    let daemon = Daemon::spawn_logging(redis, &setup, &["--configure-notifications"], "info");
    daemon.wait_for("cachepol ready", Duration::from_secs(60));
    let mut probe = 0;
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for rep in 0..sizes.reps.max(3) as u32 {
        // A new stamp (cold), then back to one compiled before (warm).
        cold.push(swap_to(redis, &setup, 100 + rep, &mut probe));
        warm.push(swap_to(redis, &setup, 1, &mut probe));
    }
    assert!(!daemon.log_text().contains("policy rejected"));
    assert_eq!(daemon.stop(), Some(0));
    let (cold, warm) = (median(cold), median(warm));
    vec![Row {
        scenario: "hot swap, rename -> new version handling events".into(),
        cachepol: format!("warm cache {warm:.0} ms, cold {cold:.0} ms"),
        baseline: "-".into(),
        ratio: "-".into(),
        target: "< 100 ms warm, < 1 s cold".into(),
        met: Some(warm < 100.0 && cold < 1000.0),
    }]
}
