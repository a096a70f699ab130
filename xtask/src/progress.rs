//! Steps with a spinner and their elapsed time, each command's output kept in a log file, and one
//! clear error when a step fails.

use std::{
    fs::File,
    io::IsTerminal as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cargo_log;

/// Returns where step logs go: `<target>/xtask/<step>.log`.
pub fn log_dir() -> PathBuf {
    crate::target_dir().join("xtask")
}

/// A running step: a spinner with the elapsed time on a terminal, plain lines otherwise (CI logs).
/// A step dropped before [`Step::done`] (an early return with `?`) is shown as failed.
pub struct Step {
    title: String,
    started: Instant,
    bar: Option<ProgressBar>,
    finished: bool,
}

impl Step {
    /// Starts showing a step.
    pub fn start(title: impl Into<String>) -> Self {
        let title = title.into();
        let bar = if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner:.cyan} {msg} [{elapsed}]")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_message(title.clone());
            bar.enable_steady_tick(Duration::from_millis(120));
            Some(bar)
        } else {
            eprintln!("==> {title} ...");
            None
        };
        Step { title, started: Instant::now(), bar, finished: false }
    }

    /// Shows what the step is doing now.
    pub fn detail(&self, detail: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(format!("{}: {detail}", self.title)),
            None => eprintln!("    {detail}"),
        }
    }

    fn finish(&mut self, mark: &str, note: Option<&str>) {
        self.finished = true;
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let note = note.map(|n| format!(": {n}")).unwrap_or_default();
        eprintln!("{mark} {} ({:.1}s){note}", self.title, self.started.elapsed().as_secs_f64());
    }

    /// Marks the step passed.
    pub fn done(mut self) {
        self.finish("✓", None);
    }

    /// Marks the step passed, with a note (a summary, a path).
    pub fn done_with(mut self, note: &str) {
        self.finish("✓", Some(note));
    }

    /// Runs `cmd` as this step's last part (see [`run_logged`]) and marks the step passed, with
    /// cargo test's summary if there is one, or failed. Returns the log's text.
    pub fn run(self, log: &str, cmd: &mut Command) -> anyhow::Result<String> {
        let text = run_logged(&self, log, cmd)?;
        match cargo_log::test_counts(&text) {
            Some(counts) => self.done_with(&counts.to_string()),
            None => self.done(),
        }
        Ok(text)
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if !self.finished {
            self.finish("✗", None);
        }
    }
}

/// Runs `cmd` with its output in `<target>/xtask/<log>.log` and returns the log's text. On failure
/// returns one error: what failed and why (the first error, or the failing tests), the lines that
/// matter, and where the whole log is.
pub fn run_logged(step: &Step, log: &str, cmd: &mut Command) -> anyhow::Result<String> {
    let path = log_dir().join(format!("{log}.log"));
    std::fs::create_dir_all(log_dir()).with_context(|| format!("creating {}", log_dir().display()))?;
    let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let program = cmd.get_program().to_string_lossy().into_owned();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| format!("{}: cannot run {program}", step.title))?;
    let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned();
    if status.success() {
        return Ok(text);
    }
    let why = cargo_log::explain(&text);
    // A single quoted line would only repeat the headline.
    let details = if why.details.lines().count() > 1 { format!("{}\n", why.details) } else { String::new() };
    Err(anyhow!(
        "{} failed: {}\n{details}(`{program}` {status}; full log: {})",
        step.title,
        why.headline,
        path.display()
    ))
}
