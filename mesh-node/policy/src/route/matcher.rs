//! One `HTTPRouteMatch`: compiled once, then matched and ranked per request.

use std::borrow::Cow;

use http::{HeaderName, Method};
use mesh_api::workload::v1::{HttpRouteMatch, PathMatchKind, ValueMatch};
use regex::Regex;

use super::RouteRequest;
use crate::{PolicyError, is_method};

#[derive(Clone, Debug)]
pub(super) struct Match {
    path: PathMatch,
    headers: Vec<(HeaderName, ValueMatcher)>,
    query: Vec<(String, ValueMatcher)>,
    method: Option<Method>,
}

#[derive(Clone, Debug)]
enum PathMatch {
    Exact(String),
    /// Without trailing `/` (except the catch-all `/`): Gateway API ignores it.
    Prefix(String),
    Regex(Regex),
}

#[derive(Clone, Debug)]
enum ValueMatcher {
    Exact(String),
    Regex(Regex),
}

impl ValueMatcher {
    fn compile(object: &str, field: &str, v: &ValueMatch) -> Result<Self, PolicyError> {
        Ok(if v.regex {
            Self::Regex(anchored(object, field, &v.value)?)
        } else {
            Self::Exact(v.value.clone())
        })
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(v) => v == value,
            Self::Regex(r) => r.is_match(value),
        }
    }
}

/// Precedence of a match among those that take a request, larger first: path kind, path
/// length, whether it names a method, how many headers, how many query parameters.
pub(super) type Rank = (u8, usize, bool, usize, usize);

impl Match {
    /// The match of a rule without matches: every request.
    pub(super) fn catch_all() -> Self {
        Match { path: PathMatch::Prefix("/".into()), headers: vec![], query: vec![], method: None }
    }

    pub(super) fn compile(object: &str, field: &str, m: &HttpRouteMatch) -> Result<Self, PolicyError> {
        let path = match &m.path {
            None => PathMatch::Prefix("/".into()),
            Some(p) => path(object, &format!("{field}.path"), p.kind, &p.value)?,
        };
        // Gateway API: of several entries for one header (or parameter), only the first counts.
        let mut headers: Vec<(HeaderName, ValueMatcher)> = Vec::new();
        for (i, h) in m.headers.iter().enumerate() {
            let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| PolicyError::BadHeaderName {
                object: object.into(),
                field: format!("{field}.headers[{i}].name"),
                value: h.name.clone(),
            })?;
            let matcher = ValueMatcher::compile(object, &format!("{field}.headers[{i}].value"), h)?;
            if !headers.iter().any(|(n, _)| *n == name) {
                headers.push((name, matcher));
            }
        }
        let mut query: Vec<(String, ValueMatcher)> = Vec::new();
        for (i, q) in m.query_params.iter().enumerate() {
            if q.name.is_empty() {
                return Err(PolicyError::Empty {
                    object: object.into(),
                    field: format!("{field}.queryParams[{i}].name"),
                });
            }
            let matcher = ValueMatcher::compile(object, &format!("{field}.queryParams[{i}].value"), q)?;
            if !query.iter().any(|(n, _)| *n == q.name) {
                query.push((q.name.clone(), matcher));
            }
        }
        let method = match m.method.as_str() {
            "" => None,
            method if is_method(method) => Method::from_bytes(method.as_bytes()).ok(),
            other => {
                return Err(PolicyError::BadMethod {
                    object: object.into(),
                    field: format!("{field}.method"),
                    value: other.into(),
                });
            }
        };
        Ok(Match { path, headers, query, method })
    }

    pub(super) fn matches(&self, request: &RouteRequest<'_>) -> bool {
        let path = match &self.path {
            PathMatch::Exact(p) => request.path == p,
            PathMatch::Prefix(p) if p == "/" => true,
            // Whole segments only: `/api` takes `/api` and `/api/x`, not `/apix`.
            PathMatch::Prefix(p) => request
                .path
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
            PathMatch::Regex(r) => r.is_match(request.path),
        };
        path && self.method.as_ref().is_none_or(|m| m.as_str() == request.method)
            && self.headers.iter().all(|(name, v)| header_value(request, name).is_some_and(|h| v.matches(&h)))
            && self.query.iter().all(|(name, v)| {
                request.query.and_then(|q| query_value(q, name)).is_some_and(|value| v.matches(&value))
            })
    }

    /// Gateway API precedence: exact path, then the longest prefix, then method, header count and
    /// query count. Regex precedence is left to implementations; here a regex ranks below every
    /// prefix but the catch-all `/`, so a route's default rule does not shadow its regex rules.
    pub(super) fn rank(&self) -> Rank {
        let (kind, len) = match &self.path {
            PathMatch::Exact(p) => (3, p.len()),
            PathMatch::Prefix(p) if p == "/" => (0, 1),
            PathMatch::Prefix(p) => (2, p.len()),
            PathMatch::Regex(_) => (1, 0),
        };
        (kind, len, self.method.is_some(), self.headers.len(), self.query.len())
    }
}

fn path(object: &str, field: &str, kind: i32, value: &str) -> Result<PathMatch, PolicyError> {
    let value_field = || format!("{field}.value");
    let kind = PathMatchKind::try_from(kind).map_err(|_| PolicyError::UnknownEnum {
        object: object.into(),
        field: format!("{field}.type"),
        value: kind,
    })?;
    if kind == PathMatchKind::RegularExpression {
        if value.is_empty() {
            return Err(PolicyError::Empty { object: object.into(), field: value_field() });
        }
        return Ok(PathMatch::Regex(anchored(object, &value_field(), value)?));
    }
    // An empty prefix is the proto default for "no path": Gateway API's default `/`.
    let value = if value.is_empty() && kind == PathMatchKind::PathPrefix { "/" } else { value };
    if !value.starts_with('/') {
        return Err(PolicyError::BadPath {
            object: object.into(),
            field: value_field(),
            value: value.into(),
        });
    }
    Ok(if kind == PathMatchKind::Exact {
        PathMatch::Exact(value.into())
    } else {
        let trimmed = value.trim_end_matches('/');
        PathMatch::Prefix(if trimmed.is_empty() { "/".into() } else { trimmed.into() })
    })
}

/// Builds a regex that must match the whole value, as Envoy's (and so Istio's) do.
fn anchored(object: &str, field: &str, pattern: &str) -> Result<Regex, PolicyError> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| PolicyError::BadRegex {
        object: object.into(),
        field: field.into(),
        value: pattern.into(),
        reason: one_line(&e),
    })
}

/// The regex crate's syntax errors draw a caret under the pattern over several lines; errors
/// here are one line, so keep only the message.
fn one_line(e: &regex::Error) -> String {
    let text = e.to_string();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("error: ").map(str::to_owned))
        .unwrap_or_else(|| text.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// A header's value; repeated headers are joined with `,` (RFC 9110 §5.3). Values that are not
/// UTF-8 match nothing.
fn header_value<'r>(request: &RouteRequest<'r>, name: &HeaderName) -> Option<Cow<'r, str>> {
    let mut values = request.headers.get_all(name).iter();
    let first = std::str::from_utf8(values.next()?.as_bytes()).ok()?;
    let mut joined = Cow::Borrowed(first);
    for v in values {
        let joined = joined.to_mut();
        joined.push(',');
        joined.push_str(std::str::from_utf8(v.as_bytes()).ok()?);
    }
    Some(joined)
}

/// The first value of query parameter `name`, percent-decoded (as the name is); `+` is kept.
fn query_value<'q>(query: &'q str, name: &str) -> Option<Cow<'q, str>> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(Some(hi)), Some(Some(lo))) =
                (bytes.get(i + 1).map(|b| hex(*b)), bytes.get(i + 2).map(|b| hex(*b)))
            && let Ok(byte) = u8::try_from(hi * 16 + lo)
        {
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_the_first_occurrence_decoded() {
        for (query, name, want) in [
            ("a=1&b=2", "b", Some("2")),
            ("a=1&a=2", "a", Some("1")),
            ("flag&x=1", "flag", Some("")),
            ("q=hello%20world", "q", Some("hello world")),
            ("%71=1", "q", Some("1")),
            ("q=a+b", "q", Some("a+b")),
            ("q=100%", "q", Some("100%")),
            ("a=1", "b", None),
        ] {
            assert_eq!(query_value(query, name).as_deref(), want, "{query} {name}");
        }
    }

    #[test]
    fn regex_errors_fit_on_one_line() {
        let err = anchored("demo/r", "rules[0].matches[0].path.value", "(").unwrap_err().to_string();
        assert!(!err.contains('\n'), "{err}");
        assert!(err.contains("unclosed group"), "{err}");
    }
}
