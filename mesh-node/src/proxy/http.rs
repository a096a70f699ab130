//! L7 in the node proxy: HTTP/1.1 and HTTP/2 connections are parsed so policies apply per
//! request and requests are routed, balanced and retried one by one.
//!
//! - [`inbound`]: destination side; authorization per request, then the app.
//! - [`outbound`]: source side, for connections to a service; routes, load balancing,
//!   timeouts, retries, outlier ejection.
//! - [`upstream`]: pooled HTTP connections from a pod to endpoints, through HBONE when meshed.
//! - [`telemetry`]: Istio-standard request metrics.

pub mod inbound;
pub mod outbound;
pub mod telemetry;
pub mod upstream;

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{HeaderMap, Response, StatusCode, body::Body, header};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy hands to hyper: streamed from a peer, buffered, or its own.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Serves one client connection with `handler`, in HTTP/2 or HTTP/1.1 (kept alive) as
/// detected; `side` names it in the log when the connection ends with an error.
pub async fn serve_connection<S, H, F>(client: S, protocol: super::protocol::Protocol, handler: H, side: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(hyper::Request<hyper::body::Incoming>) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let handler = hyper::service::service_fn(move |request| {
        let response = handler(request);
        async move { Ok::<_, std::convert::Infallible>(response.await) }
    });
    let io = hyper_util::rt::TokioIo::new(client);
    let served = match protocol {
        super::protocol::Protocol::Http2 => {
            hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(io, handler)
                .await
        }
        _ => hyper::server::conn::http1::Builder::new().keep_alive(true).serve_connection(io, handler).await,
    };
    if let Err(err) = served {
        tracing::debug!(error = %err, side, "HTTP connection ended");
    }
}

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// A response the proxy makes itself (403, 503, 504, …), with a one-line body saying why.
pub fn local_response(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let mut response = Response::new(full(format!("{message}\n")));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    headers.insert("server", header::HeaderValue::from_static("nodemesh"));
    response
}

/// The response for a request the proxy fails itself; `flags` as in the metrics. After
/// malformed framing (`DPE`) an HTTP/1 connection is closed: nothing more on it can be trusted.
pub fn failure_response(
    status: StatusCode,
    flags: &str,
    message: &str,
    protocol: crate::proxy::protocol::Protocol,
) -> Response<ProxyBody> {
    let mut response = local_response(status, message);
    if flags == "DPE" && protocol != crate::proxy::protocol::Protocol::Http2 {
        response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    }
    response
}

/// Headers that belong to one hop and are never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// Removes hop-by-hop headers, including those the `Connection` header names. An `Upgrade`
/// (e.g. h2c) is not passed on: the proxy answers in the protocol the request came in.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    for name in HOP_BY_HOP.iter().copied().chain(named.iter().map(String::as_str)) {
        headers.remove(name);
    }
    headers.remove("http2-settings");
}

/// Why a request is malformed in a way a proxy must not pass on (request smuggling), if it is.
/// hyper already rejects invalid framing it parses; this catches what it tolerates.
pub fn smuggling_risk(headers: &HeaderMap) -> Option<&'static str> {
    let lengths: Vec<&[u8]> = headers.get_all(header::CONTENT_LENGTH).iter().map(|v| v.as_bytes()).collect();
    if headers.contains_key(header::TRANSFER_ENCODING) && !lengths.is_empty() {
        return Some("both Content-Length and Transfer-Encoding");
    }
    if lengths.windows(2).any(|w| w[0] != w[1]) {
        return Some("conflicting Content-Length values");
    }
    None
}

/// A response body that reports its size and the time to its last byte once it ends (or is
/// dropped), for metrics and the access log.
pub struct Counted<B> {
    inner: B,
    bytes: u64,
    on_end: Option<Box<dyn FnOnce(u64, Instant) + Send + Sync>>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, on_end: impl FnOnce(u64, Instant) + Send + Sync + 'static) -> Self {
        Counted { inner, bytes: 0, on_end: Some(Box::new(on_end)) }
    }

    fn finish(&mut self) {
        if let Some(on_end) = self.on_end.take() {
            on_end(self.bytes, Instant::now());
        }
    }
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        polled.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use hyper::header::HeaderValue;

    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", HeaderValue::from_static("keep-alive, x-secret, Upgrade"));
        headers.insert("upgrade", HeaderValue::from_static("h2c"));
        headers.insert("http2-settings", HeaderValue::from_static("AAMAAABkAAQAAP__"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn framing_conflicts_are_smuggling_risks() {
        let mut headers = HeaderMap::new();
        headers.append("content-length", HeaderValue::from_static("5"));
        assert_eq!(smuggling_risk(&headers), None);
        headers.append("content-length", HeaderValue::from_static("5"));
        assert_eq!(smuggling_risk(&headers), None, "repeated equal values are allowed");
        headers.append("content-length", HeaderValue::from_static("50"));
        assert!(smuggling_risk(&headers).is_some());
        let mut headers = HeaderMap::new();
        headers.insert("content-length", HeaderValue::from_static("5"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        assert!(smuggling_risk(&headers).is_some());
    }
}
