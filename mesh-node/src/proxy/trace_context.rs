//! W3C trace context (`traceparent`) for HBONE streams, so one connection can be followed from
//! the source node's logs to the destination's. At L4 the proxy cannot see the app's own trace,
//! so each captured connection starts a trace; the destination logs the same trace ID.

use std::fmt;

use ring::rand::{SecureRandom as _, SystemRandom};

/// `traceparent` version 00: trace ID, parent (span) ID and whether it is sampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TraceparentError {
    #[error("traceparent must be 55 characters `00-<32 hex>-<16 hex>-<2 hex>`, got {0}")]
    Shape(usize),
    #[error("traceparent version {0:?} is not supported")]
    Version(String),
    #[error("traceparent field {0} is not lowercase hex")]
    NotHex(&'static str),
    #[error("traceparent {0} is all zeros")]
    Zero(&'static str),
}

impl TraceContext {
    /// Starts a new sampled trace with random IDs.
    pub fn start() -> Self {
        let random = SystemRandom::new();
        let mut context = TraceContext { trace_id: [0; 16], span_id: [0; 8], sampled: true };
        // The system RNG does not fail on Linux; if it ever did, an all-zero ID would be invalid,
        // so fall back to distinct non-zero bytes rather than sending one.
        if random.fill(&mut context.trace_id).is_err() || random.fill(&mut context.span_id).is_err() {
            context.trace_id = [1; 16];
            context.span_id = [1; 8];
        }
        context
    }

    /// A new span of the same trace: what a hop adds before passing a request on.
    pub fn child(&self) -> Self {
        let mut child = *self;
        if SystemRandom::new().fill(&mut child.span_id).is_err() || child.span_id == [0; 8] {
            child.span_id = [2; 8];
        }
        child
    }

    /// Continues the trace of a request's `traceparent` with a new span, or starts one (also
    /// when the header is malformed: it is the client's, and telemetry never fails a request).
    pub fn continue_from(headers: &hyper::HeaderMap) -> Self {
        match headers.get("traceparent").and_then(|v| v.to_str().ok()).map(Self::parse) {
            Some(Ok(parent)) => parent.child(),
            _ => Self::start(),
        }
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// Parses a version-00 `traceparent` header strictly.
    pub fn parse(header: &str) -> Result<Self, TraceparentError> {
        let parts: Vec<&str> = header.split('-').collect();
        let [version, trace, span, flags] = parts.as_slice() else {
            return Err(TraceparentError::Shape(header.len()));
        };
        if header.len() != 55
            || version.len() != 2
            || trace.len() != 32
            || span.len() != 16
            || flags.len() != 2
        {
            return Err(TraceparentError::Shape(header.len()));
        }
        if *version != "00" {
            return Err(TraceparentError::Version((*version).to_owned()));
        }
        let trace_id: [u8; 16] = unhex(trace).ok_or(TraceparentError::NotHex("trace-id"))?;
        let span_id: [u8; 8] = unhex(span).ok_or(TraceparentError::NotHex("parent-id"))?;
        let [flags]: [u8; 1] = unhex(flags).ok_or(TraceparentError::NotHex("trace-flags"))?;
        if trace_id == [0; 16] {
            return Err(TraceparentError::Zero("trace-id"));
        }
        if span_id == [0; 8] {
            return Err(TraceparentError::Zero("parent-id"));
        }
        Ok(TraceContext { trace_id, span_id, sampled: flags & 1 == 1 })
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{}-{}-{:02x}", hex(&self.trace_id), hex(&self.span_id), u8::from(self.sampled))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decodes lowercase hex (the W3C spec forbids uppercase) into exactly `N` bytes.
fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let bytes = text.as_bytes();
    if bytes.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// The `baggage` an HBONE client sends: who the source workload is, in OpenTelemetry's
/// Kubernetes attribute names (as Istio's ztunnel does).
pub fn baggage(namespace: &str, pod: &str, node: &str) -> String {
    format!("k8s.namespace.name={namespace},k8s.pod.name={pod},k8s.node.name={node}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_starts_distinct_traces() {
        let a = TraceContext::start();
        assert_eq!(TraceContext::parse(&a.to_string()), Ok(a));
        assert_ne!(a.trace_id, TraceContext::start().trace_id);
        assert!(a.to_string().ends_with("-01"), "sampled");
    }

    #[test]
    fn parses_the_w3c_example() {
        let parsed = TraceContext::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
        assert_eq!(parsed.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert!(parsed.sampled);
        let unsampled =
            TraceContext::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00").unwrap();
        assert!(!unsampled.sampled);
    }

    #[test]
    fn rejects_every_malformed_shape() {
        let cases = [
            ("", TraceparentError::Shape(0)),
            ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331", TraceparentError::Shape(52)),
            ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x", TraceparentError::Shape(57)),
            (
                "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                TraceparentError::Version("ff".into()),
            ),
            ("00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01", TraceparentError::NotHex("trace-id")),
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333g-01",
                TraceparentError::NotHex("parent-id"),
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0z",
                TraceparentError::NotHex("trace-flags"),
            ),
            ("00-00000000000000000000000000000000-b7ad6b7169203331-01", TraceparentError::Zero("trace-id")),
            ("00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01", TraceparentError::Zero("parent-id")),
            ("00-0af7651916cd43dd8448eb211c80319-cb7ad6b7169203331-01", TraceparentError::Shape(55)),
        ];
        for (header, expected) in cases {
            assert_eq!(TraceContext::parse(header), Err(expected), "{header:?}");
        }
    }

    #[test]
    fn baggage_names_the_source_workload() {
        assert_eq!(
            baggage("demo", "a1", "node-a"),
            "k8s.namespace.name=demo,k8s.pod.name=a1,k8s.node.name=node-a"
        );
    }
}
