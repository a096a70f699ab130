//! The result: one row per check, as JSON (`{"checks":[…],"passed":…}`) and as a table.

use serde::Serialize;

use crate::output::Table;

/// How a check ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    /// Not run, for the reason in the detail (nothing to run it on, or an earlier check
    /// failed without `--keep-going`); does not fail the run.
    Skip,
}

/// One row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    pub name: &'static str,
    pub status: Status,
    /// What was checked and what happened, on one line.
    pub detail: String,
    pub duration_ms: u64,
}

/// Returns the JSON report.
pub fn to_json(checks: &[CheckResult]) -> serde_json::Value {
    serde_json::json!({
        "checks": checks,
        "passed": checks.iter().all(|c| c.status != Status::Fail),
    })
}

/// Renders the JSON report as a table and a verdict line.
pub fn render(value: &serde_json::Value) -> String {
    let mut table = Table::new(&["check", "status", "duration", "detail"]);
    let checks = value["checks"].as_array().cloned().unwrap_or_default();
    for check in &checks {
        table.row(vec![
            check["name"].as_str().unwrap_or_default().to_owned(),
            check["status"].as_str().unwrap_or_default().to_uppercase(),
            format!("{} ms", check["duration_ms"]),
            check["detail"].as_str().unwrap_or_default().to_owned(),
        ]);
    }
    let count = |status: &str| checks.iter().filter(|c| c["status"] == status).count();
    let verdict = if value["passed"] == true {
        format!("\n{} of {} checks passed ({} skipped)\n", count("pass"), checks.len(), count("skip"))
    } else {
        format!("\n{} of {} checks FAILED\n", count("fail"), checks.len())
    };
    table.render() + &verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_row_fails_the_run_and_a_skipped_one_does_not() {
        let row = |name, status| CheckResult { name, status, detail: "d".into(), duration_ms: 5 };
        let passed = to_json(&[row("a", Status::Pass), row("b", Status::Skip)]);
        assert_eq!(passed["passed"], true);
        assert_eq!(passed["checks"][1]["status"], "skip");
        assert!(render(&passed).contains("1 of 2 checks passed (1 skipped)"), "{}", render(&passed));
        let failed = to_json(&[row("a", Status::Pass), row("b", Status::Fail)]);
        assert_eq!(failed["passed"], false);
        let text = render(&failed);
        assert!(
            text.starts_with("CHECK   STATUS   DURATION   DETAIL\na       PASS     5 ms       d\n"),
            "{text}"
        );
        assert!(text.contains("1 of 2 checks FAILED"), "{text}");
    }
}
