//! What both ends of an HBONE tunnel share: HTTP/2 sizing and the stream body type.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;

/// Per-stream flow-control window: large enough that one stream is not window-bound on a fast
/// link (measured in the benchmarks issue).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Per-connection window: several full-speed streams at once.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// Streams one tunnel carries at once; beyond this the client opens another tunnel to the
/// same destination rather than queueing streams behind a busy connection.
pub const MAX_STREAMS_PER_TUNNEL: u32 = 100;
/// How long a certificate may be awaited before a connection needing it fails.
pub const CERT_WAIT: Duration = Duration::from_secs(5);

/// CONNECT requests and responses carry no body: the stream itself is the tunnel.
pub type TunnelBody = Empty<Bytes>;
