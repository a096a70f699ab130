//! Reading a step's log: the few lines that explain a failure, and cargo test's verdicts.
//!
//! Everything here is a pure function over the log's text, so the failure messages people see are
//! tested without running anything.

use std::fmt::Write as _;

/// At most this many lines of a log are quoted in a failure message.
const MAX_EXCERPT_LINES: usize = 12;
/// At most this many lines of one failing test's output are quoted (its last ones: the panic).
const MAX_TEST_LINES: usize = 25;
/// Failing tests whose output is quoted; the others are only named.
const MAX_TESTS_QUOTED: usize = 4;
/// Quoted lines are cut at this many characters (a linker command line can be thousands).
const MAX_LINE_CHARS: usize = 200;

/// Why a step failed, told in a headline and a few quoted lines.
#[derive(Debug, PartialEq, Eq)]
pub struct Explanation {
    /// One line: the first error, or which tests failed.
    pub headline: String,
    /// The lines worth reading, already quoted and indented.
    pub details: String,
}

/// A test that failed, with the output libtest captured for it.
#[derive(Debug, PartialEq, Eq)]
pub struct FailedTest {
    pub name: String,
    pub output: Vec<String>,
}

/// Explains a failed command from its log: failing tests if cargo test ran some, else the error
/// lines (rustc, cargo, apt, panics), else the last lines.
pub fn explain(log: &str) -> Explanation {
    let failed = failed_tests(log);
    if !failed.is_empty() {
        return explain_tests(&failed);
    }
    let lines: Vec<&str> = log.lines().collect();
    if let Some(explained) = explain_fmt(&lines) {
        return explained;
    }
    let errors: Vec<usize> = (0..lines.len()).filter(|&i| is_error_line(lines[i])).collect();
    let Some(&first) = errors.first() else {
        let tail = &lines[lines.len().saturating_sub(MAX_EXCERPT_LINES)..];
        let headline = tail.iter().rev().find(|l| !l.trim().is_empty()).map_or("", |l| l.trim());
        return Explanation { headline: cut(headline), details: quote_all(tail) };
    };
    // Each error with the few lines that follow it (rustc's `-->` location and source), as many
    // as fit.
    let mut quoted: Vec<&str> = Vec::new();
    for &start in &errors {
        let end = errors.iter().find(|&&e| e > start).copied().unwrap_or(lines.len()).min(start + 5);
        quoted.extend(lines[start..end].iter().filter(|l| !l.trim().is_empty()));
    }
    quoted.truncate(MAX_EXCERPT_LINES);
    Explanation { headline: cut(lines[first].trim()), details: quote_all(&quoted) }
}

/// Explains `cargo fmt --check` output: which files, and the start of the diff.
fn explain_fmt(lines: &[&str]) -> Option<Explanation> {
    let mut files: Vec<&str> = Vec::new();
    for line in lines {
        // `Diff in /work/main/xtask/src/lib.rs:35:`
        let Some(place) = line.strip_prefix("Diff in ") else { continue };
        let file = place.trim_end_matches(':').rsplit_once(':').map_or(place, |(file, _line)| file);
        if !files.contains(&file) {
            files.push(file);
        }
    }
    if files.is_empty() {
        return None;
    }
    let first = lines.iter().position(|l| l.starts_with("Diff in "))?;
    let shown = &lines[first..(first + MAX_EXCERPT_LINES).min(lines.len())];
    Some(Explanation {
        headline: format!("not formatted: {} (run `cargo fmt --all`)", files.join(", ")),
        details: quote_all(shown),
    })
}

fn explain_tests(failed: &[FailedTest]) -> Explanation {
    let names: Vec<&str> = failed.iter().map(|t| t.name.as_str()).collect();
    let headline = format!(
        "{} test{} failed: {}",
        failed.len(),
        if failed.len() == 1 { "" } else { "s" },
        names.join(", ")
    );
    let mut details = String::new();
    for test in failed.iter().take(MAX_TESTS_QUOTED) {
        let _ = writeln!(details, "  ---- {} ----", test.name);
        let skipped = test.output.len().saturating_sub(MAX_TEST_LINES);
        if skipped > 0 {
            let _ = writeln!(details, "  | … {skipped} earlier lines in the log");
        }
        let _ = writeln!(details, "{}", quote_all(&test.output[skipped..]));
    }
    if failed.len() > MAX_TESTS_QUOTED {
        let _ = writeln!(details, "  (output of the other {} in the log)", failed.len() - MAX_TESTS_QUOTED);
    }
    Explanation { headline, details: details.trim_end().to_owned() }
}

/// Returns the tests libtest reported as failed, in order, with their captured output.
///
/// libtest prints `---- <name> stdout ----` blocks with each failing test's output, then a
/// `failures:` list of the names; cargo test prints this once per test binary.
pub fn failed_tests(log: &str) -> Vec<FailedTest> {
    let mut failed: Vec<FailedTest> = Vec::new();
    let mut current: Option<FailedTest> = None;
    let mut in_name_list = false;
    for line in log.lines() {
        if let Some(name) = line.strip_prefix("---- ").and_then(|l| l.strip_suffix(" stdout ----")) {
            failed.extend(current.take());
            current = Some(FailedTest { name: name.to_owned(), output: Vec::new() });
            in_name_list = false;
        } else if line == "failures:" {
            failed.extend(current.take());
            in_name_list = true;
        } else if line.starts_with("test result:") {
            failed.extend(current.take());
            in_name_list = false;
        } else if in_name_list {
            // The name list: tests that failed without a captured-output block (e.g. a timeout).
            let name = line.trim();
            if !name.is_empty() && !failed.iter().any(|t| t.name == name) {
                failed.push(FailedTest { name: name.to_owned(), output: Vec::new() });
            }
        } else if let Some(test) = &mut current {
            test.output.push(line.to_owned());
        }
    }
    failed.extend(current);
    for test in &mut failed {
        test.output = without_backtraces(&test.output);
        while test.output.last().is_some_and(|l| l.trim().is_empty()) {
            test.output.pop();
        }
    }
    failed
}

/// Drops `stack backtrace:` blocks (with `RUST_BACKTRACE` set): dozens of frames of the panic
/// machinery that push the test's own output out of the excerpt. The log keeps them.
fn without_backtraces(lines: &[String]) -> Vec<String> {
    let mut kept = Vec::new();
    let mut in_backtrace = false;
    for line in lines {
        if line == "stack backtrace:" {
            in_backtrace = true;
            kept.push("stack backtrace: (in the log)".to_owned());
            continue;
        }
        if in_backtrace {
            if line.starts_with(char::is_whitespace) || line.starts_with("note: Some details are omitted") {
                continue;
            }
            in_backtrace = false;
        }
        // A frame whose header was interleaved with another thread's output still goes.
        if is_backtrace_frame(line) {
            continue;
        }
        kept.push(line.clone());
    }
    kept
}

/// Whether `line` is a backtrace frame (`  16: std::…`) or its location (`      at src/x.rs:1:2`).
fn is_backtrace_frame(line: &str) -> bool {
    let trimmed = line.trim_start();
    if trimmed.len() == line.len() {
        return false;
    }
    let frame_number =
        trimmed.split_once(": ").is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    frame_number || trimmed.starts_with("at ")
}

/// How many tests passed, failed and were ignored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestCounts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl std::ops::AddAssign for TestCounts {
    fn add_assign(&mut self, other: Self) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
    }
}

impl std::fmt::Display for TestCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} passed, {} failed, {} ignored", self.passed, self.failed, self.ignored)
    }
}

/// Sums cargo test's `test result:` lines, or returns `None` if no test binary ran.
pub fn test_counts(log: &str) -> Option<TestCounts> {
    let mut counts = TestCounts::default();
    let mut seen = false;
    for line in log.lines() {
        let Some(results) =
            line.strip_prefix("test result: ok.").or_else(|| line.strip_prefix("test result: FAILED."))
        else {
            continue;
        };
        seen = true;
        for part in results.split(';') {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next().and_then(|n| n.parse::<u64>().ok()), words.next())
            else {
                continue;
            };
            match what {
                "passed" => counts.passed += n,
                "failed" => counts.failed += n,
                "ignored" => counts.ignored += n,
                _ => {}
            }
        }
    }
    seen.then_some(counts)
}

/// Returns whether a log line reports an error: rustc and cargo (`error`, `error[E0425]`), apt
/// (`E:`), a panic, or a failing shell command.
fn is_error_line(line: &str) -> bool {
    let lower = line.trim_start().to_lowercase();
    lower.starts_with("error:")
        || lower.starts_with("error[")
        || line.starts_with("E: ")
        || lower.starts_with("fatal")
        || line.contains("panicked at")
}

fn quote_all(lines: &[impl AsRef<str>]) -> String {
    lines.iter().map(|l| format!("  | {}", cut(l.as_ref()))).collect::<Vec<_>>().join("\n")
}

fn cut(line: &str) -> String {
    match line.char_indices().nth(MAX_LINE_CHARS) {
        Some((at, _)) => format!("{} …", &line[..at]),
        None => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUSTC_FAILURE: &str = "   Compiling mesh-ebpf v0.1.0 (/work/main/mesh-ebpf/programs)
error[E0425]: cannot find value `x` in this scope
  --> src/main.rs:10:5
   |
10 |     x
   |     ^ not found in this scope

For more information about this error, try `rustc --explain E0425`.
error: could not compile `mesh-ebpf` (bin \"mesh-ebpf\") due to 1 previous error
";

    const TEST_FAILURE: &str = "running 3 tests
test capture::outbound ... ok
test capture::inbound ... FAILED
test mtls::strict ... FAILED

failures:

---- capture::inbound stdout ----
starting node-a
thread 'capture::inbound' panicked at tests/capture.rs:40:5:
server saw 10.1.9.1, expected 10.1.1.2

---- mtls::strict stdout ----
thread 'mtls::strict' panicked at tests/mtls.rs:12:9:
connection was not refused


failures:
    capture::inbound
    mtls::strict

test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 3.21s

error: test failed, to rerun pass `--test capture`
";

    #[test]
    fn rustc_errors_give_the_first_error_and_its_location() {
        let explained = explain(RUSTC_FAILURE);
        assert_eq!(explained.headline, "error[E0425]: cannot find value `x` in this scope");
        assert!(explained.details.contains("--> src/main.rs:10:5"), "{}", explained.details);
        assert!(explained.details.contains("could not compile"), "{}", explained.details);
        assert!(!explained.details.contains("Compiling"), "{}", explained.details);
    }

    #[test]
    fn failing_tests_are_named_with_their_output() {
        let failed = failed_tests(TEST_FAILURE);
        let names: Vec<&str> = failed.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["capture::inbound", "mtls::strict"]);
        assert_eq!(failed[0].output.len(), 3);
        assert_eq!(failed[0].output[2], "server saw 10.1.9.1, expected 10.1.1.2");

        let explained = explain(TEST_FAILURE);
        assert_eq!(explained.headline, "2 tests failed: capture::inbound, mtls::strict");
        assert!(explained.details.contains("---- mtls::strict ----"), "{}", explained.details);
        assert!(explained.details.contains("| connection was not refused"), "{}", explained.details);
    }

    #[test]
    fn backtraces_are_left_in_the_log() {
        let log = "---- t stdout ----
before
thread 't' (26653) panicked at src/lib.rs:8:9:
boom
stack backtrace:
   0: __rustc::rust_begin_unwind
             at /rustc/x/library/std/src/panicking.rs:689:5
   1: failcrate::tests::t
             at ./src/lib.rs:8:9
note: Some details are omitted, run with `RUST_BACKTRACE=full` for a verbose backtrace.
after

failures:
    t
";
        let failed = failed_tests(log);
        assert_eq!(
            failed[0].output,
            [
                "before",
                "thread 't' (26653) panicked at src/lib.rs:8:9:",
                "boom",
                "stack backtrace: (in the log)",
                "after"
            ]
        );
    }

    #[test]
    fn frames_without_their_header_are_left_in_the_log_too() {
        let log = "---- t stdout ----
thread 'worker' panicked at src/a.rs:1:1:
boom
other thread's line stack backtrace:
  16: std::sys::backtrace::__rust_begin_short_backtrace
             at /rustc/x/library/std/src/sys/backtrace.rs:166:18
  17: start_thread
after

failures:
    t
";
        let failed = failed_tests(log);
        assert_eq!(
            failed[0].output,
            [
                "thread 'worker' panicked at src/a.rs:1:1:",
                "boom",
                "other thread's line stack backtrace:",
                "after"
            ]
        );
    }

    #[test]
    fn a_test_without_captured_output_is_still_named() {
        let log = "failures:\n    slow::hangs\n\ntest result: FAILED. 0 passed; 1 failed; 0 ignored;\n";
        let failed = failed_tests(log);
        assert_eq!(failed, [FailedTest { name: "slow::hangs".into(), output: vec![] }]);
    }

    #[test]
    fn long_test_output_keeps_its_end() {
        let mut log = String::from("---- noisy stdout ----\n");
        for i in 0..100 {
            log.push_str(&format!("line {i}\n"));
        }
        log.push_str("\nfailures:\n    noisy\n");
        let explained = explain(&log);
        assert!(explained.details.contains("… 75 earlier lines"), "{}", explained.details);
        assert!(explained.details.contains("| line 99"));
        assert!(!explained.details.contains("| line 74\n"));
    }

    #[test]
    fn unformatted_files_are_named() {
        let log = "Diff in /w/xtask/src/lib.rs:35:\n }\n-pub fn a()  {}\n+pub fn a() {}\n\
                   Diff in /w/xtask/src/lib.rs:50:\n-x\n+y\nDiff in /w/mesh-node/src/main.rs:3:\n-a\n+b\n";
        let explained = explain(log);
        assert_eq!(
            explained.headline,
            "not formatted: /w/xtask/src/lib.rs, /w/mesh-node/src/main.rs (run `cargo fmt --all`)"
        );
        assert!(
            explained.details.starts_with("  | Diff in /w/xtask/src/lib.rs:35:"),
            "{}",
            explained.details
        );
    }

    #[test]
    fn apt_errors_are_found() {
        let log = "Reading package lists...\nE: Unable to locate package llvm-22-dev\n";
        assert_eq!(explain(log).headline, "E: Unable to locate package llvm-22-dev");
    }

    #[test]
    fn without_error_lines_the_last_lines_are_shown() {
        let log: String = (0..30).map(|i| format!("step {i}\n")).collect();
        let explained = explain(&log);
        assert_eq!(explained.headline, "step 29");
        assert_eq!(explained.details.lines().count(), MAX_EXCERPT_LINES);
    }

    #[test]
    fn the_excerpt_is_bounded() {
        let log: String = (0..50).map(|i| format!("error: problem {i}\n  detail\n")).collect();
        assert_eq!(explain(&log).details.lines().count(), MAX_EXCERPT_LINES);
        let long = format!("error: {}", "x".repeat(5000));
        assert!(explain(&long).headline.chars().count() <= MAX_LINE_CHARS + 2);
    }

    #[test]
    fn sums_test_result_lines() {
        let log = "test result: ok. 14 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s\n\
                   noise\n\
                   test result: FAILED. 2 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s\n";
        let counts = test_counts(log);
        assert_eq!(counts, Some(TestCounts { passed: 16, failed: 3, ignored: 1 }));
        assert_eq!(counts.map(|c| c.to_string()).as_deref(), Some("16 passed, 3 failed, 1 ignored"));
        assert_eq!(test_counts("nothing"), None);
    }
}
