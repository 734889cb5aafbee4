//! The SDK's trigger ledger on the fake host, through the `cascade` fixture
//! (its doc example: `flow:meta:<id>` rewritten or gone drops
//! `flow:state:<id>`): a first sweep records a baseline, a later sweep acts
//! on exactly the triggers that changed, appeared or went while nobody
//! listened, live events are recorded so a sweep does not redo them, and a
//! walk cut short by its limits goes on at the next sweep.

mod common;

use cachepol::fake::{AppWrite, FakeHost};
use cachepol::sandbox::grants::{GrantConfig, Grants};
use cachepol::sandbox::runtime::LoadOptions;
use cachepol::wit::{Event, SweepReason};

async fn cascade(config: &str) -> FakeHost {
    let runtime = common::runtime();
    let compiled = common::compile(&runtime, &common::fixture("cascade"));
    FakeHost::load(&runtime, &compiled, config).await.unwrap()
}

/// Flows `ids`, each with its metadata (value `v1`) and its state.
async fn flows(host: &mut FakeHost, ids: impl IntoIterator<Item = u32>) {
    for id in ids {
        host.redis().app_set(&format!("flow:meta:{id}"), b"v1", None);
        host.redis().app_set(&format!("flow:state:{id}"), b"s", None);
    }
    host.redis().take_events();
}

/// Flows `ids` among `others` keys that are no trigger, for walks of many
/// pages.
async fn flows_among(host: &mut FakeHost, ids: std::ops::Range<u32>, others: u32) {
    for i in 0..others {
        host.redis().app_set(&format!("other:{i}"), b"x", None);
    }
    flows(host, ids).await;
}

/// Sweep, and return the sweep's note: the triggers acted on, then the
/// ledger's report.
async fn sweep(host: &mut FakeHost) -> String {
    host.sweep(SweepReason::Gap).await;
    let last = host.deliveries().last().unwrap();
    assert!(matches!(last.event, Event::Sweep(_)));
    match &last.report.result {
        Ok(outcome) => outcome.note.clone().unwrap_or_default(),
        Err(e) => panic!("the sweep failed: {e}"),
    }
}

fn acted(note: &str) -> &str {
    note.split(" | ").next().unwrap()
}

fn states(host: &FakeHost) -> Vec<String> {
    host.redis().snapshot().into_keys().filter(|k| k.starts_with("flow:state:")).collect()
}

#[tokio::test]
async fn a_first_sweep_records_a_baseline_and_acts_on_nothing() {
    let mut host = cascade("{}").await;
    flows(&mut host, 1..=3).await;
    let note = sweep(&mut host).await;
    assert_eq!(acted(&note), "", "{note}");
    assert!(note.contains("3 recorded as the baseline") && note.contains("walk finished"), "{note}");
    assert_eq!(states(&host).len(), 3);
    let keys = host.redis().snapshot();
    assert_eq!(keys["cachepol-state:cascade:seen:flow:meta:1"].value.as_string(), Some(&b"v1"[..]));
    assert!(keys.contains_key("cachepol-state:cascade:since"));
    assert!(!keys.contains_key("cachepol-state:cascade:walk"), "a finished walk leaves no position");
    assert_eq!(host.failures().count(), 0);
}

#[tokio::test]
async fn changed_removed_and_new_triggers_are_acted_on_once_and_unchanged_ones_not() {
    let mut host = cascade("{}").await;
    flows(&mut host, 1..=4).await;
    sweep(&mut host).await;

    host.set_listening(false);
    host.set("flow:meta:1", b"v2", None).await; // changed
    host.del(&["flow:meta:2"]).await; // removed
    host.set("flow:meta:5", b"v1", None).await; // new since the baseline
    host.redis().app_set("flow:state:5", b"s", None);
    host.set("flow:meta:3", b"v1", None).await; // rewritten, same value
    host.set_listening(true);
    assert!(host.deliveries().len() == 1, "nothing was delivered while away");

    let note = sweep(&mut host).await;
    assert_eq!(acted(&note), "+flow:meta:1 +flow:meta:5 -flow:meta:2", "{note}");
    assert!(note.contains("3 triggers acted on (1 removed)") && note.contains("2 unchanged"), "{note}");
    assert_eq!(states(&host), ["flow:state:3", "flow:state:4"]);
    assert!(
        !host.redis().snapshot().contains_key("cachepol-state:cascade:seen:flow:meta:2"),
        "a gone trigger is forgotten"
    );

    // Recorded: the next sweep has nothing to do.
    host.redis().app_set("flow:state:1", b"s", None);
    let note = sweep(&mut host).await;
    assert_eq!(acted(&note), "", "{note}");
    assert!(note.contains("0 triggers acted on") && note.contains("4 unchanged"), "{note}");
    assert!(host.redis().snapshot().contains_key("flow:state:1"));
    assert_eq!(host.failures().count(), 0);
}

#[tokio::test]
async fn what_a_live_event_acted_on_is_not_redone_by_the_sweep() {
    let mut host = cascade("{}").await;
    flows(&mut host, 1..=2).await;
    sweep(&mut host).await;
    host.set("flow:meta:1", b"v2", None).await;
    host.del(&["flow:meta:2"]).await;
    assert!(states(&host).is_empty(), "both cascaded live");
    flows(&mut host, [9]).await;
    host.redis().app_set("flow:state:1", b"s", None);
    let note = sweep(&mut host).await;
    assert_eq!(acted(&note), "+flow:meta:9", "only the flow created while away: {note}");
    assert_eq!(states(&host), ["flow:state:1"]);
}

#[tokio::test]
async fn a_trigger_that_is_a_hash_is_acted_on_live_and_recorded_as_existing() {
    let mut host = cascade("{}").await;
    host.redis().app_set("flow:state:1", b"s", None);
    let fields = [("owner".to_owned(), "ci".to_owned())].into_iter().collect();
    host.app_write("flow:meta:1", &AppWrite::Hset(fields)).await.unwrap();
    assert_eq!(host.failures().count(), 0, "{:?}", host.failures().map(|(_, f)| f.to_string()).collect::<Vec<_>>());
    assert!(states(&host).is_empty(), "the cascade ran");
    let record = &host.redis().snapshot()["cachepol-state:cascade:seen:flow:meta:1"];
    assert_eq!(record.value.as_string(), Some(&b""[..]), "its existence, not a value");
}

#[tokio::test]
async fn what_is_watched_decides_what_counts_as_a_change() {
    // Writes only: a removal is not looked for (no records pass).
    let mut host = cascade(r#"{"watch": "writes"}"#).await;
    flows(&mut host, 1..=2).await;
    sweep(&mut host).await;
    host.set_listening(false);
    host.del(&["flow:meta:1"]).await;
    host.set("flow:meta:2", b"v2", None).await;
    host.set_listening(true);
    assert_eq!(acted(&sweep(&mut host).await), "+flow:meta:2");

    // Removals only: records are markers, a rewrite is no change.
    let mut host = cascade(r#"{"watch": "removals"}"#).await;
    flows(&mut host, 1..=2).await;
    sweep(&mut host).await;
    assert_eq!(host.redis().snapshot()["cachepol-state:cascade:seen:flow:meta:1"].value.as_string(), Some(&b""[..]));
    host.set_listening(false);
    host.del(&["flow:meta:1"]).await;
    host.set("flow:meta:2", b"v2", None).await;
    host.set_listening(true);
    assert_eq!(acted(&sweep(&mut host).await), "-flow:meta:1");
    assert_eq!(states(&host), ["flow:state:2"]);
}

#[tokio::test]
async fn a_walk_cut_short_by_its_limits_goes_on_at_the_next_sweep() {
    // Pages of 10 keys, 6 calls per sweep: 120 flows and 300 other keys
    // take many sweeps to walk, and each goes on where the last stopped.
    let config = r#"{"page_size": 10, "walk_calls": 6, "changes_per_sweep": 7}"#;
    let mut host = cascade(config).await;
    flows_among(&mut host, 0..120, 300).await;
    let mut sweeps = 0;
    loop {
        let note = sweep(&mut host).await;
        sweeps += 1;
        assert!(note.contains("as the baseline"), "sweep {sweeps} still records the baseline: {note}");
        if note.ends_with("walk finished") {
            break;
        }
        assert!(host.redis().snapshot().contains_key("cachepol-state:cascade:walk"), "its place is kept");
        assert!(sweeps < 400, "the walk never finishes");
    }
    assert!(sweeps > 3, "the limits cut the walk: {sweeps} sweeps");
    let records = host.redis().snapshot().into_keys().filter(|k| k.contains(":seen:")).count();
    assert_eq!(records, 120, "every trigger recorded once the walk is done");

    // 30 triggers changed while away: at most 7 acted on per sweep, every
    // one exactly once over the sweeps that follow.
    host.set_listening(false);
    for id in 0..30 {
        host.set(&format!("flow:meta:{id}"), b"v2", None).await;
    }
    host.set_listening(true);
    let mut all = Vec::new();
    for _ in 0..400 {
        let note = sweep(&mut host).await;
        let now: Vec<String> = acted(&note).split_whitespace().map(str::to_owned).collect();
        assert!(now.len() <= 7, "{note}");
        all.extend(now);
        if note.ends_with("walk finished") && all.len() == 30 {
            break;
        }
    }
    all.sort();
    let mut want: Vec<String> = (0..30).map(|id| format!("+flow:meta:{id}")).collect();
    want.sort();
    assert_eq!(all, want, "each changed trigger acted on exactly once");
    assert_eq!(states(&host).len(), 90);
    assert_eq!(host.failures().count(), 0);
}

#[tokio::test]
async fn a_walk_stopped_by_the_hosts_call_budget_still_goes_on_and_finishes() {
    // The ledger's own limit is left high: the host's budget of 40 calls
    // per event stops each sweep first, which fails it (the host's rule),
    // but the walk's place was kept, so the next sweep goes on.
    let runtime = common::runtime();
    let compiled = common::compile(&runtime, &common::fixture("cascade"));
    let budgets = cachepol::sandbox::budget::Budgets { host_calls: 40, ..Default::default() };
    let options = LoadOptions { config: r#"{"page_size": 10}"#.into(), budgets, ..Default::default() };
    let mut host = FakeHost::load_on(&runtime, &compiled, &options, cachepol::fake::FakeRedis::new()).await.unwrap();
    flows_among(&mut host, 0..60, 200).await;
    let mut sweeps = 0;
    loop {
        host.sweep(SweepReason::Gap).await;
        sweeps += 1;
        let outcome = &host.deliveries().last().unwrap().report.result;
        match outcome {
            Ok(o) if o.note.as_deref().is_some_and(|n| n.ends_with("walk finished")) => break,
            Ok(_) => {}
            Err(e) => assert!(e.to_string().contains("more than 40 host calls"), "{e}"),
        }
        assert!(sweeps < 100, "the walk never finishes");
    }
    assert!(host.failures().count() > 0, "the host's budget cut the walk");
    let records = host.redis().snapshot().into_keys().filter(|k| k.contains(":seen:")).count();
    assert_eq!(records, 60);
}

#[tokio::test]
async fn a_ledger_without_its_grants_warns_and_the_live_work_goes_on() {
    let runtime = common::runtime();
    let compiled = common::compile(&runtime, &common::fixture("cascade"));
    let grant = |pattern: &str, op: &str| GrantConfig { pattern: pattern.into(), ops: vec![op.into()] };
    let grants = Grants::from_config(&[grant("flow:meta:*", "read"), grant("flow:state:*", "delete")]).unwrap();
    // A ledger kept outside the state namespace the host grants every
    // policy (`cachepol-state:cascade:*`), which the operator's narrowed
    // grants leave out.
    let options = LoadOptions {
        config: r#"{"state_prefix": "flow-ledger:"}"#.into(),
        grants: Some(grants),
        ..Default::default()
    };
    let mut host = FakeHost::load_on(&runtime, &compiled, &options, cachepol::fake::FakeRedis::new()).await.unwrap();
    flows(&mut host, [1]).await;
    host.del(&["flow:meta:1"]).await;
    assert!(states(&host).is_empty(), "the cascade ran");
    sweep(&mut host).await;
    assert_eq!(host.failures().count(), 0, "neither the event nor the sweep failed");
    assert!(host.denials().count() >= 2, "the refusals are still counted");
}
