//! Fuzzing the parsers of untrusted input with generated input: scenario
//! files, deploy-stream entries, deploy webhook bodies, policy manifests and
//! keyspace channel names. Each must answer with a value or a clear error, never panic, and
//! what it accepts must be what it promises.
//!
//! A short run is part of `cargo test`; a long one:
//! `PROPTEST_CASES=200000 cargo test --release -p cachepol --test fuzz`.

use std::collections::HashMap;

use cachepol::admin::webhook;
use cachepol::fake::scenario::Scenario;
use cachepol::intake::deploy::{entry_fields, parse_entry};
use cachepol::intake::events::parse_channel;
use cachepol::sandbox::manifest::Manifest;
use cachepol::wit::{self, Grant, KeyOps, KeySubscription, Subscriptions};
use proptest::prelude::*;
use redis::Value;
use redis::streams::StreamId;

/// Text that looks like scenario TOML often enough to get past the first
/// line, and arbitrary bytes-as-text the rest of the time.
fn scenario_text() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        Just("[keys]".to_owned()),
        Just("[expect]".to_owned()),
        Just("[[steps]]".to_owned()),
        Just("[config]".to_owned()),
        "[a-z_]{1,12} = \\[?\"[a-z:*?\\[\\]\\\\]{0,12}\"\\]?",
        "(set|del|advance|sweep|deploy|event|expect) = [\\[{\"0-9a-z =,}\\]]{0,30}",
        "\"[a-z:]{1,10}\" = \\{ value = \"[a-z]{0,5}\", ttl = -?[0-9.]{0,6} \\}",
        ".{0,40}",
    ];
    prop::collection::vec(line, 0..12).prop_map(|lines| lines.join("\n"))
}

fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        "[\\[\\]{}\":,a-z=0-9 ]{0,30}".prop_map(|s| Value::BulkString(s.into_bytes())),
        prop::collection::vec(any::<u8>(), 0..20).prop_map(Value::BulkString),
        any::<i64>().prop_map(Value::Int),
        Just(Value::Nil),
    ]
}

fn stream_entry() -> impl Strategy<Value = StreamId> {
    let name = prop_oneof![Just("service"), Just("files"), Just("tags"), Just("id"), Just("other")];
    (".{0,20}", prop::collection::vec((name, field_value()), 0..6)).prop_map(|(id, fields)| StreamId {
        id,
        map: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect::<HashMap<_, _>>(),
        ..StreamId::default()
    })
}

/// A webhook body: JSON objects with the hook's fields (and others) whose
/// values are of any JSON kind, or arbitrary bytes.
fn webhook_body() -> impl Strategy<Value = Vec<u8>> {
    let value = prop_oneof![
        Just("null".to_owned()),
        "-?[0-9]{1,20}(\\.[0-9]{1,5})?(e[0-9]{1,3})?",
        "\"[a-z=\\\\ \u{e9}\u{0}]{0,12}\"",
        "\\[(\"[a-z=]{0,6}\",?){0,4}\\]",
        "\\{(\"[a-z=]{0,4}\": ?\"[a-z=]{0,4}\",?){0,3}\\}",
        Just("\"\\ud800\"".to_owned()),
    ];
    let field = prop_oneof![Just("service"), Just("files"), Just("tags"), Just("id"), Just("other")];
    let object = prop::collection::vec((field, value), 0..6).prop_map(|fields| {
        let inner: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
        format!("{{{}}}", inner.join(", ")).into_bytes()
    });
    // A list of the same values: a struct must not be read from one.
    let list =
        prop::collection::vec("\"[a-z]{0,8}\"", 0..4).prop_map(|items| format!("[{}]", items.join(",")).into_bytes());
    prop_oneof![object, list, prop::collection::vec(any::<u8>(), 0..200)]
}

fn key_ops(bits: u8) -> KeyOps {
    [KeyOps::READ, KeyOps::WRITE, KeyOps::DELETE, KeyOps::EXPIRE, KeyOps::LOCK]
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .fold(KeyOps::empty(), |acc, (_, op)| acc | *op)
}

fn glob() -> impl Strategy<Value = String> {
    "[a-z:*?\\[\\]^\\\\-]{0,12}"
}

fn raw_manifest() -> impl Strategy<Value = wit::types::Manifest> {
    (
        prop_oneof!["[a-z0-9-]{1,70}", ".{0,20}"],
        prop_oneof!["[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}", ".{0,12}"],
        prop::collection::vec((prop::collection::vec("[a-z_]{0,8}", 0..3), prop::collection::vec(glob(), 0..3)), 0..3),
        prop::collection::vec(".{0,10}", 0..3),
        prop::option::of(any::<u32>()),
        prop::collection::vec((glob(), any::<u8>()), 0..5),
    )
        .prop_map(|(name, version, keys, deploys, sweep, grants)| wit::types::Manifest {
            name,
            version,
            description: String::new(),
            subscriptions: Subscriptions {
                keys: keys.into_iter().map(|(ops, patterns)| KeySubscription { ops, patterns }).collect(),
                deploys,
                sweep_interval_secs: sweep,
            },
            grants: grants.into_iter().map(|(pattern, bits)| Grant { pattern, ops: key_ops(bits) }).collect(),
        })
}

proptest! {
    #[test]
    fn scenario_files_parse_or_say_why(text in scenario_text()) {
        for json in [false, true] {
            if let Ok(s) = Scenario::parse(&text, json) {
                // Accepted scenarios can fail: they hold an expectation.
                prop_assert!(s.expect.is_some() || s.load_error.is_some() || !s.steps.is_empty());
            }
        }
    }

    #[test]
    fn deploy_entries_parse_or_say_why(entry in stream_entry()) {
        match parse_entry(&entry) {
            Ok(event) => prop_assert!(!event.service.trim().is_empty()),
            Err(reason) => prop_assert!(!reason.is_empty()),
        }
    }

    #[test]
    fn webhook_bodies_parse_or_say_why(body in webhook_body()) {
        match webhook::parse(&body) {
            Ok(hook) => {
                let text = String::from_utf8_lossy(&body);
                prop_assert!(!hook.service.is_empty() && hook.service == hook.service.trim());
                prop_assert!(text.contains("\"service\"") && text.trim_start().starts_with('{'), "{}", text);
                prop_assert!(!text.contains("\"other\""), "unknown fields are refused: {}", text);
                prop_assert!(hook.files.iter().all(|f| !f.is_empty()));
                prop_assert!(hook.id.as_deref().is_none_or(|id| !id.is_empty()));
                // What the webhook takes, the deploy reader reads back the
                // same: never a 202 for a hook that is then dead-lettered.
                let fields = entry_fields(&hook.service, &hook.files, &hook.tags, hook.id.as_deref());
                let entry = StreamId {
                    id: "1-0".into(),
                    map: fields.into_iter().map(|(k, v)| (k.to_owned(), Value::BulkString(v.into_bytes()))).collect(),
                    ..StreamId::default()
                };
                let read = parse_entry(&entry).map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
                prop_assert_eq!(&read.service, &hook.service);
                prop_assert_eq!(&read.files, &hook.files);
                prop_assert_eq!(&read.tags, &hook.tags);
                prop_assert_eq!(read.id, hook.id.clone().unwrap_or_else(|| "1-0".into()));
            }
            Err(reason) => prop_assert!(!reason.is_empty()),
        }
    }

    #[test]
    fn manifests_validate_or_name_every_problem(raw in raw_manifest()) {
        let name = raw.name.clone();
        match Manifest::validate(raw) {
            Ok(m) => {
                prop_assert_eq!(&m.name, &name);
                prop_assert!(!name.is_empty() && name.len() <= 64);
                prop_assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
            }
            Err(e) => prop_assert!(e.to_string().starts_with("invalid manifest: ")),
        }
    }

    #[test]
    fn keyspace_channels_parse_only_keyevents(channel in prop_oneof!["__keyevent@[0-9]{1,3}__:[a-z_]{0,10}", ".{0,30}"]) {
        if let Some((db, op)) = parse_channel(&channel) {
            prop_assert!(!op.is_empty());
            let rest = channel.strip_prefix("__keyevent@");
            prop_assert!(rest.is_some(), "{}", channel);
            let (digits, tail) = rest.unwrap().split_once("__:").unwrap();
            prop_assert_eq!(digits.parse::<u32>().ok(), Some(db));
            prop_assert_eq!(tail, op);
        }
    }
}
