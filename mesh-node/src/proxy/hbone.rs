//! What both ends of an HBONE tunnel share: HTTP/2 sizing and limits.

use std::time::Duration;

/// Per-stream flow-control window: large enough that one stream is not window-bound on a fast
/// link (measured in the benchmarks issue).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Per-connection window: several full-speed streams at once.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// Streams one tunnel carries at once; beyond this the client opens another tunnel to the
/// same destination rather than queueing streams behind a busy connection.
pub const MAX_STREAMS_PER_TUNNEL: u32 = 100;
/// Largest header block a CONNECT request or response may carry: HBONE's are a few hundred
/// bytes, so anything near this is refused rather than buffered.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// How long a certificate may be awaited before a connection needing it fails.
pub const CERT_WAIT: Duration = Duration::from_secs(5);
