//! Missed triggers are reconciled: a `last_updated:<genre>` write whose
//! notification never reached genre-invalidation (the daemon stopped or
//! killed, its subscription cut, notifications off for a moment) is
//! invalidated by the next sweep, through the policy's trigger ledger kept
//! in Redis; a genre that did not change is left alone.

use std::thread;
use std::time::{Duration, Instant};

use crate::support::{Daemon, RedisServer, Setup, eventually};

/// A genre's cache keys, as the application writes them.
fn cache_keys(genre: &str) -> [String; 3] {
    [format!("graph_data:{genre}"), format!("playlist_data:{genre}"), format!("service_playlist:{genre}:web")]
}

/// The application rebuilds `genre`'s cache, then marks the genre updated
/// with `stamp`: one pipeline, so the trigger always follows the keys.
fn rebuild(conn: &mut redis::Connection, genre: &str, stamp: &str) {
    let mut pipe = redis::pipe();
    for key in cache_keys(genre) {
        pipe.cmd("SET").arg(key).arg("v").ignore();
    }
    pipe.cmd("SET").arg(format!("last_updated:{genre}")).arg(stamp).ignore();
    pipe.query::<()>(conn).unwrap();
}

fn has_keys(redis: &RedisServer, genre: &str) -> bool {
    cache_keys(genre).iter().any(|k| redis.exists(k))
}

#[test]
fn a_trigger_written_while_the_daemon_was_stopped_is_invalidated_by_the_start_sweep() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    for genre in ["rock", "jazz", "pop"] {
        rebuild(&mut conn, genre, "1700000000");
    }
    let setup = Setup::new(&["genre-invalidation"]);

    // A first start on an existing cache: the baseline, no genre wiped.
    let daemon = Daemon::start(&redis, &setup);
    daemon.wait_for("3 `last_updated:*` keys recorded as they are", Duration::from_secs(20));
    assert!(["rock", "jazz", "pop"].iter().all(|g| cache_keys(g).iter().all(|k| redis.exists(k))));
    assert_eq!(daemon.stop(), Some(0));

    // While nobody listens: rock is updated, jazz rewritten with its same
    // stamp (no change), pop untouched.
    redis.cmd::<()>(&["SET", "last_updated:rock", "1700000500"]);
    redis.cmd::<()>(&["SET", "last_updated:jazz", "1700000000"]);

    let daemon = Daemon::start(&redis, &setup);
    daemon.wait_for("changed while unobserved, invalidated: rock", Duration::from_secs(20));
    assert!(!has_keys(&redis, "rock"), "rock's cache was invalidated by the start sweep");
    for genre in ["jazz", "pop"] {
        assert!(cache_keys(genre).iter().all(|k| redis.exists(k)), "{genre} did not change: its cache stays");
    }
    let log = daemon.log_text();
    assert!(!log.contains("genre `jazz` changed") && !log.contains("genre `pop` changed"), "{log}");
    assert!(!log.contains("recorded as they are"), "the ledger survived the restart in Redis: no new baseline");

    // Recorded: a later sweep does not invalidate rock's rebuilt cache.
    for key in cache_keys("rock") {
        redis.cmd::<()>(&["SET", &key, "rebuilt"]);
    }
    // The start sweep's audit line (its note), then the manual sweep's.
    daemon.wait_for("1 triggers acted on (0 removed)", Duration::from_secs(20));
    let swept = || daemon.log_text().matches("; walk finished").count();
    let before = swept();
    let (asked, text) = crate::support::cli(&redis, &["sweep", "genre-invalidation"]);
    assert!(asked, "{text}");
    eventually(&daemon, "the manual sweep ran", || swept() > before);
    assert!(cache_keys("rock").iter().all(|k| redis.exists(k)), "{}", daemon.log_text());
    assert_eq!(daemon.stop(), Some(0));
}

/// How long the application writes, and how often a fault hits.
const SOAK: Duration = Duration::from_secs(20);
const FAULT_EVERY: Duration = Duration::from_secs(4);
/// Genres the soak's application updates, each once, about 20 a second:
/// a trigger lost in a fault is not healed by a later one for the same
/// genre, only by a sweep. This bounds the writes in count as well.
const GENRES: usize = 400;
const UPDATE_EVERY: Duration = Duration::from_millis(50);

/// The soak, shortened: an application rebuilding genres' caches
/// and marking them updated while faults hit every few seconds (the
/// subscription killed, notifications off for a moment, the daemon
/// `kill -9`ed and restarted). Once the sweeps that follow the faults ran,
/// no genre whose trigger was written after its keys has keys left
/// (without the ledger, those whose trigger fell in a fault kept theirs).
/// A restarted daemon stands by until the dead one's lease lapses (replicas
/// are on by default), so its one takeover sweep may find more changed
/// triggers than one sweep acts on (100): the rest wait for the next sweep,
/// here a periodic one every 3 s.
#[test]
fn genre_updates_under_faults_are_all_invalidated_once_the_sweeps_ran() {
    let redis = RedisServer::start();
    let setup =
        Setup::new(&["genre-invalidation"]).config("[policies.genre-invalidation]\nconfig = { sweep_every_secs = 3 }");
    let mut daemon = Daemon::start(&redis, &setup);
    let genres: Vec<String> = (0..GENRES).map(|g| format!("g{g}")).collect();

    let start = Instant::now();
    let writer = {
        let (mut conn, genres) = (redis.conn(), genres.clone());
        thread::spawn(move || {
            let mut updated = Vec::new();
            for (n, genre) in genres.iter().enumerate() {
                if start.elapsed() >= SOAK {
                    break;
                }
                rebuild(&mut conn, genre, &n.to_string());
                updated.push(genre.clone());
                thread::sleep(UPDATE_EVERY);
            }
            updated
        })
    };

    let mut faults = Vec::new();
    for round in 1.. {
        let at = FAULT_EVERY * round;
        if at >= SOAK {
            break;
        }
        thread::sleep(at.saturating_sub(start.elapsed()));
        match round % 4 {
            1 | 0 => {
                redis.cmd::<redis::Value>(&["CLIENT", "KILL", "TYPE", "pubsub"]);
                faults.push("subscription killed");
            }
            2 => {
                let flags: Vec<String> = redis.cmd(&["CONFIG", "GET", "notify-keyspace-events"]);
                redis.cmd::<()>(&["CONFIG", "SET", "notify-keyspace-events", ""]);
                thread::sleep(Duration::from_millis(1500));
                redis.cmd::<()>(&["CONFIG", "SET", "notify-keyspace-events", &flags[1]]);
                faults.push("notifications off for 1.5 s");
            }
            _ => {
                daemon.kill();
                daemon = Daemon::start(&redis, &setup);
                faults.push("daemon killed and restarted");
            }
        }
    }
    let updated = writer.join().unwrap();
    assert!(updated.len() > GENRES / 2, "the faults came while genres were updated ({} updated)", updated.len());
    assert_eq!(faults.len(), 4, "{faults:?}");

    // Each updated genre's last write was its trigger, after its keys.
    let stale = || updated.iter().filter(|g| has_keys(&redis, g)).cloned().collect::<Vec<_>>();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stale().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let left = stale();
    let log = daemon.log_text();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    assert!(left.is_empty(), "{} genres kept stale keys after {faults:?}: {left:?}\n{}", left.len(), tail.join("\n"));
    assert_eq!(daemon.stop(), Some(0));
}
