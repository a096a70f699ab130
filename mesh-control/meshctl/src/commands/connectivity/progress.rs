//! Progress while the checks run, on stderr (stdout carries only the result): a spinner per
//! check on a terminal, plain lines otherwise (or with `-o json|yaml`).

use std::{io::IsTerminal as _, time::Duration};

use indicatif::{ProgressBar, ProgressStyle};

use super::report::{CheckResult, Status};

#[derive(Debug)]
pub struct Progress {
    spinner: bool,
    bar: Option<ProgressBar>,
    total: usize,
    index: usize,
}

impl Progress {
    /// Spinners only for people: stdout and stderr are terminals and the output is a table.
    pub fn new(for_people: bool, total: usize) -> Self {
        let spinner = for_people && std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
        Progress { spinner, bar: None, total, index: 0 }
    }

    /// Announces a check.
    pub fn start(&mut self, name: &str, what: &str) {
        self.index += 1;
        let line = format!("[{}/{}] {name}: {what}", self.index, self.total);
        if self.spinner {
            let bar = ProgressBar::new_spinner();
            if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
                bar.set_style(style);
            }
            bar.set_message(line);
            bar.enable_steady_tick(Duration::from_millis(100));
            self.bar = Some(bar);
        } else {
            eprintln!("{line}");
        }
    }

    /// Says what the running check is doing now.
    pub fn step(&self, what: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(format!("[{}/{}] {what}", self.index, self.total)),
            None => eprintln!("      {what}"),
        }
    }

    /// Reports a check's result.
    pub fn finish(&mut self, result: &CheckResult) {
        let status = match result.status {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
        };
        match self.bar.take() {
            Some(bar) => {
                // Cleared, then a plain line: the result stays, one line per check.
                bar.finish_and_clear();
                eprintln!(
                    "{status} [{}/{}] {} ({} ms)",
                    self.index, self.total, result.name, result.duration_ms
                );
            }
            None => eprintln!("      {status} ({} ms): {}", result.duration_ms, result.detail),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
