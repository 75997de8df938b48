//! The shipped Prometheus alerting rules (`ops/alerts.yml`) parse, cover the failures an
//! operator must hear about, and name only metrics the code exports (a renamed metric would
//! otherwise silence an alert without anyone noticing).

use std::{collections::BTreeSet, path::Path};

const PROMQL_WORDS: &[&str] = &[
    "and", "or", "unless", "by", "without", "increase", "rate", "time", "sum", "max", "min", "m",
    "s", "h",
];

fn rust_sources(dir: &Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
}

#[test]
fn alert_rules_parse_cover_the_failures_and_name_exported_metrics() {
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let text = std::fs::read_to_string(root.join("ops/alerts.yml")).unwrap();
    let doc: serde_json::Value = serde_norway::from_str(&text).expect("valid YAML");
    let rules: Vec<&serde_json::Value> = doc["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").iter())
        .collect();
    let mut code = String::new();
    for krate in [
        "platform",
        "write-side",
        "outbox-relay",
        "read-side",
        "saga",
    ] {
        rust_sources(&root.join(krate).join("src"), &mut code);
    }
    let mut metrics = BTreeSet::new();
    for rule in &rules {
        let alert = rule["alert"].as_str().expect("every rule is an alert");
        let expr = rule["expr"]
            .as_str()
            .unwrap_or_else(|| panic!("{alert}: no expr"));
        assert!(
            rule["annotations"]["summary"].is_string(),
            "{alert}: no summary"
        );
        let idents = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with(|c: char| c.is_ascii_lowercase()) && w.contains('_'))
            .filter(|w| !PROMQL_WORDS.contains(w));
        for metric in idents {
            assert!(
                code.contains(&format!("\"{metric}\"")),
                "{alert}: metric {metric} is not exported by the code"
            );
            metrics.insert(metric.to_owned());
        }
    }
    for needed in [
        "shop_role_up",
        "projection_lag_events",
        "outbox_oldest_unpublished_age_seconds",
        "saga_dlq_depth",
        "sagas_awaiting_a_step",
    ] {
        assert!(metrics.contains(needed), "no alert on {needed}");
    }
}
