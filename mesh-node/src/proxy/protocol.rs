//! Protocol detection: a port declared HTTP (`appProtocol` or port name) is parsed as such;
//! an undeclared one is sniffed from the client's first bytes, waiting at most
//! [`DETECT_TIMEOUT`] (a server-speaks-first protocol sends nothing, and stays L4).

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::traffic::AppProtocol;

/// How long an undeclared port waits for the client's first bytes before treating the
/// connection as opaque TCP.
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(200);

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const METHODS: [&[u8]; 9] =
    [b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"OPTIONS ", b"PATCH ", b"TRACE ", b"CONNECT "];

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Protocol {
    Http1,
    Http2,
    Tcp,
}

impl Protocol {
    pub fn is_http(self) -> bool {
        self != Protocol::Tcp
    }

    /// The label Istio's metrics use.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http1 | Protocol::Http2 => "http",
            Protocol::Tcp => "tcp",
        }
    }
}

/// What the first bytes say, or `None` if more bytes are needed to tell.
pub fn classify(first: &[u8]) -> Option<Protocol> {
    let h2 = &H2_PREFACE[..first.len().min(H2_PREFACE.len())];
    let could_be_h2 = first.starts_with(h2);
    if first.len() >= H2_PREFACE.len() && could_be_h2 {
        return Some(Protocol::Http2);
    }
    let mut undecided = could_be_h2;
    for method in METHODS {
        if first.starts_with(method) {
            return Some(Protocol::Http1);
        }
        undecided |= method.starts_with(first);
    }
    if undecided { None } else { Some(Protocol::Tcp) }
}

/// Decides the protocol of a connection, reading (not consuming) its first bytes when the port
/// is not declared. Returns the stream with those bytes put back in front.
pub async fn detect<S>(mut stream: S, declared: AppProtocol) -> io::Result<(Protocol, Prefixed<S>)>
where
    S: AsyncRead + Unpin,
{
    // A port declared HTTP is still sniffed for the version: `appProtocol: http` says nothing
    // about HTTP/2 with prior knowledge, and HTTP clients speak first, so this costs no wait.
    if declared == AppProtocol::Opaque {
        return Ok((decide(declared, None), Prefixed::new(Bytes::new(), stream)));
    }
    let mut first = BytesMut::with_capacity(H2_PREFACE.len());
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    let sniffed = loop {
        if let Some(protocol) = classify(&first) {
            break Some(protocol);
        }
        let mut chunk = [0u8; 24];
        let want = H2_PREFACE.len() - first.len();
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk[..want])).await {
            Ok(Ok(0)) | Err(_) => break None,
            Ok(Ok(n)) => first.extend_from_slice(&chunk[..n]),
            Ok(Err(err)) => return Err(err),
        }
    };
    Ok((decide(declared, sniffed), Prefixed::new(first.freeze(), stream)))
}

/// Returns how a connection is read, from its port's declaration and what sniffing its first
/// bytes found ([`classify`]; `None`: nothing decisive before the timeout or the end). Shared by
/// [`detect`] and `meshctl explain`.
///
/// An opaque port is never parsed. On a port declared HTTP, bytes that are neither HTTP/1 nor
/// the HTTP/2 preface are still parsed as the declared version (the parser then answers 400 to
/// garbage); an undeclared port is HTTP only when the bytes say so.
pub fn decide(declared: AppProtocol, sniffed: Option<Protocol>) -> Protocol {
    let fallback = match declared {
        AppProtocol::Opaque => return Protocol::Tcp,
        AppProtocol::Http1 => Protocol::Http1,
        AppProtocol::Http2 => Protocol::Http2,
        AppProtocol::Detect => Protocol::Tcp,
    };
    match sniffed {
        Some(Protocol::Tcp) | None => fallback,
        Some(http) => http,
    }
}

/// A stream with bytes already read from it put back in front.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Prefixed { prefix, inner }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The bytes put back, and the stream after them.
    pub fn into_parts(self) -> (Bytes, S) {
        (self.prefix, self.inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    #[test]
    fn first_bytes_classify() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"DELETE /x"), Some(Protocol::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(b"PRI * HTTP/2"), None, "could still be the h2 preface");
        assert_eq!(classify(b"P"), None, "POST, PUT, PATCH or PRI");
        assert_eq!(classify(b"GEX"), Some(Protocol::Tcp));
        assert_eq!(classify(b"\x16\x03\x01"), Some(Protocol::Tcp), "a TLS ClientHello");
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Protocol::Tcp), "methods are case-sensitive");
        assert_eq!(classify(b""), None);
    }

    #[test]
    fn the_declaration_and_the_sniffed_bytes_decide_together() {
        use AppProtocol::{Detect, Http1, Http2, Opaque};
        use Protocol::{Http1 as H1, Http2 as H2, Tcp};
        for (declared, sniffed, want) in [
            (Opaque, Some(H1), Tcp),
            (Opaque, None, Tcp),
            (Detect, Some(H1), H1),
            (Detect, Some(H2), H2),
            (Detect, Some(Tcp), Tcp),
            (Detect, None, Tcp),
            (Http1, Some(H2), H2),
            (Http1, Some(Tcp), H1),
            (Http1, None, H1),
            (Http2, Some(Tcp), H2),
        ] {
            assert_eq!(decide(declared, sniffed), want, "{declared:?} + {sniffed:?}");
        }
    }

    #[tokio::test]
    async fn sniffed_bytes_are_replayed_and_silence_means_tcp() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"GET /a HTTP/1.1\r\n\r\n").await.expect("write");
        let (protocol, mut stream) = detect(server, AppProtocol::Detect).await.expect("detect");
        assert_eq!(protocol, Protocol::Http1);
        let mut got = vec![0u8; 19];
        stream.read_exact(&mut got).await.expect("read");
        assert_eq!(got, b"GET /a HTTP/1.1\r\n\r\n");

        let (_quiet, server) = tokio::io::duplex(64);
        let started = std::time::Instant::now();
        let (protocol, _) = detect(server, AppProtocol::Detect).await.expect("detect");
        assert_eq!(protocol, Protocol::Tcp);
        assert!(started.elapsed() >= DETECT_TIMEOUT);

        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(H2_PREFACE).await.expect("write");
        let (protocol, _) = detect(server, AppProtocol::Http1).await.expect("declared");
        assert_eq!(protocol, Protocol::Http2, "a port declared HTTP still tells the versions apart");

        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"\x16\x03\x01").await.expect("write");
        drop(client);
        let (protocol, _) = detect(server, AppProtocol::Http1).await.expect("declared");
        assert_eq!(protocol, Protocol::Http1, "the declaration wins over unrecognised bytes");
    }
}
