//! Steps with a spinner, output kept in a log file, and one clear line when they fail.

use std::{
    fs::File,
    io::IsTerminal as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};

/// Where step logs go: `target/xtask/<step>.log`.
pub fn log_dir() -> PathBuf {
    crate::workspace_root().join("target/xtask")
}

/// A running step: spinner on a terminal, plain lines otherwise (CI logs).
pub struct Step {
    title: String,
    started: Instant,
    bar: Option<ProgressBar>,
}

impl Step {
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
        Step { title, started: Instant::now(), bar }
    }

    /// Shows a detail of what the step is doing now.
    pub fn detail(&self, detail: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(format!("{}: {detail}", self.title)),
            None => eprintln!("    {detail}"),
        }
    }

    fn finish(&self, mark: &str, note: &str) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        eprintln!("{mark} {} ({:.1}s){note}", self.title, self.started.elapsed().as_secs_f64());
    }

    pub fn done(self) {
        self.finish("✓", "");
    }

    pub fn done_with(self, note: &str) {
        self.finish("✓", &format!(": {note}"));
    }

    pub fn failed(self) {
        self.finish("✗", "");
    }
}

/// Runs `cmd` with its output in `target/xtask/<log>.log`. On failure returns one clear error:
/// what failed, the most telling lines of the output, and where the whole log is.
pub fn run_logged(step: &Step, log: &str, cmd: &mut Command) -> anyhow::Result<PathBuf> {
    let path = log_dir().join(format!("{log}.log"));
    std::fs::create_dir_all(log_dir())?;
    let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let program = cmd.get_program().to_string_lossy().into_owned();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| format!("{}: cannot run {program}", step.title))?;
    if !status.success() {
        bail!(
            "{}: {program} failed ({status})\n{}\nfull log: {}",
            step.title,
            excerpt(&path),
            path.display()
        );
    }
    Ok(path)
}

/// Returns the lines of a log that explain a failure: error lines with a little context, or
/// the last lines when there are none.
pub fn excerpt(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let mut picked = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let lower = line.to_lowercase();
        if lower.starts_with("error") || line.contains("panicked at") {
            picked.extend(lines[i..(i + 6).min(lines.len())].iter().map(|l| quote(l)));
            if picked.len() >= 24 {
                break;
            }
        }
    }
    if picked.is_empty() {
        picked = lines[lines.len().saturating_sub(12)..].iter().map(|l| quote(l)).collect();
    }
    picked.join("\n")
}

/// Quotes one log line, cut short: a linker command line can be thousands of characters.
fn quote(line: &str) -> String {
    const MAX: usize = 200;
    match line.char_indices().nth(MAX) {
        Some((cut, _)) => format!("  | {} …", &line[..cut]),
        None => format!("  | {line}"),
    }
}
