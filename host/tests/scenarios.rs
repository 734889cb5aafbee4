//! Every bundled policy's scenario files pass on the fake host, run from
//! `cargo test` (not only through the CLI), and a scenario that states the
//! wrong outcome fails with a readable diff.

mod common;

use cachepol::fake::scenario::{self, Scenario};

#[tokio::test]
async fn bundled_policy_scenarios_pass() {
    let runtime = common::runtime();
    let mut ran = 0;
    for entry in std::fs::read_dir(common::workspace().join("policies")).unwrap() {
        let dir = entry.unwrap().path();
        let scenarios = dir.join("scenarios");
        if !scenarios.is_dir() {
            continue;
        }
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let compiled = common::compile(&runtime, &common::policy(&name));
        for file in scenario::collect_files(&[scenarios]).unwrap() {
            let parsed = Scenario::from_file(&file).unwrap();
            let report = scenario::run(&runtime, &compiled, &parsed).await;
            assert!(report.passed(), "{}:\n{report}", file.display());
            ran += 1;
        }
    }
    assert!(ran >= 30, "expected the bundled scenarios, ran {ran}");
}

#[tokio::test]
async fn a_wrong_expectation_fails_with_a_diff() {
    let runtime = common::runtime();
    let compiled = common::compile(&runtime, &common::policy("genre-invalidation"));
    let wrong = Scenario::parse(
        r#"
        [keys]
        "graph_data:dance" = "g"
        "graph_data:rock" = "g"
        [[steps]]
        deploy = { tags = { genre = "dance" } }
        [expect]
        present = ["graph_data:dance"]
        absent = ["graph_data:rock"]
        ttl = { "graph_data:rock" = [10, 20] }
        "#,
        false,
    )
    .unwrap();
    let report = scenario::run(&runtime, &compiled, &wrong).await;
    assert!(!report.passed());
    let text = report.to_string();
    assert!(text.contains("graph_data:dance: expected present, but it is missing"), "{text}");
    assert!(text.contains("graph_data:rock: expected absent, but found \"g\""), "{text}");
    assert!(text.contains("ttl of graph_data:rock: expected 10..=20 s, found persistent"), "{text}");
}

#[tokio::test]
async fn unexpected_denials_and_failures_fail_a_scenario() {
    let runtime = common::runtime();
    let compiled = common::compile(&runtime, &common::policy("genre-invalidation"));
    // The same narrowed grants as the bundled denial scenario, but without
    // stating the denial: the scenario must fail, naming it.
    let silent = Scenario::parse(
        r#"
        grants = [{ pattern = "graph_data:*", ops = ["delete"] }, { pattern = "last_updated:*", ops = ["read"] }]
        [[steps]]
        deploy = { tags = { genre = "dance" } }
        [expect]
        "#,
        false,
    )
    .unwrap();
    let report = scenario::run(&runtime, &compiled, &silent).await;
    let text = report.to_string();
    assert!(text.contains("denials: expected none, got delete-matching `service_playlist:dance:*`"), "{text}");
    assert!(text.contains("failed deliveries: expected 0, got 1"), "{text}");
}
