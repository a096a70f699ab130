//! Log output for both binaries (text or one JSON object per line, on stderr) and the log
//! filter, changeable while running through the admin endpoints' `/logging`: `GET` shows the
//! filter in force, `POST /logging?level=<EnvFilter directive>` replaces it (e.g. `debug`,
//! `info,mesh_node::proxy=debug`). An invalid directive is refused with 400 and the filter
//! stays as it was.
//!
//! The subscriber is process-wide, so its reload handle is too: [`init`] installs both.

use std::sync::OnceLock;

use hyper::{Method, Response, StatusCode};
use tracing_subscriber::{
    EnvFilter, Layer as _, Registry, filter::LevelFilter, layer::SubscriberExt as _, reload,
    util::SubscriberInitExt as _,
};

use crate::http::{AdminRequest, Body, json, method_not_allowed, respond};

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, the event's fields at the top level.
    Json,
}

/// The filter used when `RUST_LOG` is unset or invalid.
pub const DEFAULT_FILTER: &str = "info";

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the process's subscriber: the filter from `RUST_LOG` (else [`DEFAULT_FILTER`]),
/// reloadable through [`serve`], and the `log` bridge. A second call changes nothing.
pub fn init(format: LogFormat) {
    let from_env = std::env::var("RUST_LOG").ok().and_then(|value| parse(&value).ok());
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(DEFAULT_FILTER));
    let (filter, handle) = reload::Layer::new(filter);
    let output = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => {
            tracing_subscriber::fmt::layer().json().flatten_event(true).with_writer(std::io::stderr).boxed()
        }
    };
    // The `log` bridge is installed too; it carries e.g. aya-log's kernel records.
    if tracing_subscriber::registry().with(filter).with(output).try_init().is_ok() {
        let _ = FILTER.set(handle);
    }
}

/// Why a filter was refused.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("empty log filter: give an EnvFilter directive, e.g. `debug` or `info,mesh_node=debug`")]
    Empty,
    #[error("invalid log filter {directive:?}: {reason}")]
    Invalid { directive: String, reason: String },
}

/// Parses an `EnvFilter` directive strictly (nothing is silently dropped).
pub fn parse(directive: &str) -> Result<EnvFilter, FilterError> {
    let directive = directive.trim();
    if directive.is_empty() {
        return Err(FilterError::Empty);
    }
    EnvFilter::builder()
        .with_regex(false)
        .parse(directive)
        .map_err(|err| FilterError::Invalid { directive: directive.to_owned(), reason: err.to_string() })
}

/// Returns the filter in force, if [`init`] installed one.
pub fn current() -> Option<String> {
    FILTER.get().and_then(|handle| handle.with_current(ToString::to_string).ok())
}

/// Replaces the filter in force; returns the previous one. The change is logged (at INFO,
/// before switching when the new filter would hide it, else after).
pub fn set(directive: &str) -> Result<String, SetError> {
    let filter = parse(directive)?;
    let handle = FILTER.get().ok_or(SetError::NotInstalled)?;
    let previous = current().unwrap_or_default();
    let level = filter.to_string();
    let shown_after = filter.max_level_hint().is_none_or(|max| max >= LevelFilter::INFO);
    if !shown_after {
        tracing::info!(previous = %previous, level = %level, "log filter changed");
    }
    handle.reload(filter).map_err(|err| SetError::Reload(err.to_string()))?;
    if shown_after {
        tracing::info!(previous = %previous, level = %level, "log filter changed");
    }
    Ok(previous)
}

/// Why the filter could not be replaced.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("logging was not initialised with a reloadable filter")]
    NotInstalled,
    #[error("cannot install the new filter: {0}")]
    Reload(String),
}

/// Serves `/logging`: `GET` answers `{"level": …}`; `POST ?level=…` sets it and answers
/// `{"level": …, "previous": …}`; a missing or invalid level is a 400 naming the problem.
pub fn serve(request: &AdminRequest) -> Response<Body> {
    let text = |status, message: String| respond(status, "text/plain", format!("{message}\n"));
    match request.method {
        Method::GET => match current() {
            Some(level) => json(&serde_json::json!({ "level": level })),
            None => text(StatusCode::SERVICE_UNAVAILABLE, SetError::NotInstalled.to_string()),
        },
        Method::POST => {
            let Some(directive) = request.param("level") else {
                return text(
                    StatusCode::BAD_REQUEST,
                    "missing ?level=<EnvFilter directive>, e.g. /logging?level=debug".into(),
                );
            };
            match set(directive) {
                Ok(previous) => {
                    json(&serde_json::json!({ "level": current().unwrap_or_default(), "previous": previous }))
                }
                Err(SetError::Filter(err)) => {
                    let kept = current().unwrap_or_default();
                    text(StatusCode::BAD_REQUEST, format!("{err}; the log filter stays {kept:?}"))
                }
                Err(err) => text(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()),
            }
        }
        _ => method_not_allowed("GET, POST"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_are_parsed_strictly() {
        assert!(parse("debug").is_ok());
        assert!(parse("info,mesh_node::proxy=debug").is_ok());
        assert!(matches!(parse("  "), Err(FilterError::Empty)));
        let err = parse("mesh_node=loud").expect_err("unknown level");
        assert!(err.to_string().starts_with("invalid log filter \"mesh_node=loud\""), "{err}");
        assert!(parse("info,[span{").is_err());
    }

    #[test]
    fn a_bad_request_names_the_problem() {
        let missing = serve(&AdminRequest::new(Method::POST, "/logging"));
        assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
        let bad = serve(&AdminRequest::new(Method::POST, "/logging?level=mesh_node%3Dloud"));
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            serve(&AdminRequest::new(Method::DELETE, "/logging")).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
