//! One HBONE stream (an HTTP/2 CONNECT stream, either end) as a byte stream, driven directly on
//! `h2` rather than through hyper's upgrade.
//!
//! Why: hyper hands an upgraded HTTP/2 stream's writes to a task of its own through a channel
//! (a copy and a task wake-up per write) and copies every received chunk out again. Here the
//! relay's task sends and receives on the stream itself, and [`relay_hbone`] moves the bytes as
//! shared `Bytes` between the socket and HTTP/2 framing without copying them in between.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use super::{
    protocol::Prefixed,
    relay::{ChunkReader, Meter},
};

/// A CONNECT stream, read and written like a socket.
pub struct HboneStream {
    tx: Sending,
    rx: Receiving,
}

impl HboneStream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        HboneStream { tx: Sending { send, ended: false }, rx: Receiving { recv, unread: Bytes::new() } }
    }
}

/// The stream's sending half.
struct Sending {
    send: SendStream<Bytes>,
    /// END_STREAM has been sent.
    ended: bool,
}

impl Sending {
    /// Sends from the front of `data` as much as the peer's flow-control window allows, without
    /// copying it; ready once something was sent.
    fn poll_send(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        let n = ready!(self.poll_window(cx, data.len()))?;
        self.send.send_data(data.split_to(n), false).map_err(h2_io_error)?;
        Poll::Ready(Ok(()))
    }

    /// Waits until the peer's window allows sending; returns how much of `wanted` fits.
    fn poll_window(&mut self, cx: &mut Context<'_>, wanted: usize) -> Poll<io::Result<usize>> {
        self.send.reserve_capacity(wanted);
        loop {
            let capacity = self.send.capacity();
            if capacity > 0 {
                return Poll::Ready(Ok(capacity.min(wanted)));
            }
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(err)) => return Poll::Ready(Err(h2_io_error(err))),
                // The stream is no longer open for sending: the peer reset it.
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    /// Sends END_STREAM (a half-close), once.
    fn end(&mut self) -> io::Result<()> {
        if !std::mem::replace(&mut self.ended, true) {
            self.send.send_data(Bytes::new(), true).map_err(h2_io_error)?;
        }
        Ok(())
    }
}

/// The stream's receiving half.
struct Receiving {
    recv: RecvStream,
    /// Received but not yet read.
    unread: Bytes,
}

impl Receiving {
    /// The next chunk received, as HTTP/2 framed it (`None` at the peer's end of stream).
    /// Flow-control credit goes back to the peer as the chunk is handed over: the reader holds
    /// one chunk at a time.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.unread.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.unread))));
        }
        loop {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(None)),
                Some(Ok(chunk)) if chunk.is_empty() => continue,
                Some(Ok(chunk)) => {
                    let _ = self.recv.flow_control().release_capacity(chunk.len());
                    return Poll::Ready(Ok(Some(chunk)));
                }
                Some(Err(err)) => return Poll::Ready(read_error(err)),
            }
        }
    }
}

/// A peer that ends or cancels its stream has closed it; any other reset or error is an error.
fn read_error(err: h2::Error) -> io::Result<Option<Bytes>> {
    match err.reason() {
        Some(Reason::NO_ERROR | Reason::CANCEL) => Ok(None),
        _ => Err(h2_io_error(err)),
    }
}

fn h2_io_error(err: h2::Error) -> io::Error {
    if err.is_io() {
        err.into_io().unwrap_or_else(|| io::ErrorKind::Other.into())
    } else {
        io::Error::other(err)
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Some(mut chunk) = ready!(self.rx.poll_chunk(cx))? else {
            return Poll::Ready(Ok(()));
        };
        let n = chunk.len().min(buf.remaining());
        buf.put_slice(&chunk[..n]);
        chunk.advance(n);
        self.rx.unread = chunk;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.tx.poll_window(cx, data.len()))?;
        self.tx.send.send_data(Bytes::copy_from_slice(&data[..n]), false).map_err(h2_io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Sent data is queued on the connection, whose task writes it out.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.tx.end())
    }
}

/// Per-direction read size a connection starts with (idle connections stay small).
const READ_SIZE: usize = 16 * 1024;
/// What a busy direction reads at once: large HTTP/2 frames and full TLS records.
const BULK_READ_SIZE: usize = 256 * 1024;

/// Relays between a socket and an HBONE stream until both directions have ended, like
/// [`super::splice::relay_tcp`] (half-closes passed on, an error in either ends both), with the bytes
/// read from the socket sent on as they are and the stream's chunks written straight to the
/// socket. Bytes already read from either side (protocol detection) go first. Returns
/// (socket → stream, stream → socket) byte counts.
pub async fn relay_hbone<M: Meter, N: Meter>(
    socket: Prefixed<TcpStream>,
    stream: Prefixed<HboneStream>,
    to_stream: &M,
    to_socket: &N,
) -> io::Result<(u64, u64)> {
    let (socket_prefix, mut socket) = socket.into_parts();
    let (stream_prefix, HboneStream { mut tx, mut rx }) = stream.into_parts();
    if !stream_prefix.is_empty() {
        // Read by detection before anything still unread (which it was read from).
        let mut joined = BytesMut::from(stream_prefix);
        joined.extend_from_slice(&rx.unread);
        rx.unread = joined.freeze();
    }
    let (socket_read, socket_write) = socket.split();
    tokio::try_join!(
        socket_to_stream(socket_read, &mut tx, socket_prefix, to_stream),
        stream_to_socket(&mut rx, socket_write, to_socket),
    )
}

/// Reads the socket and sends what it read on the stream, ending the stream at the socket's end.
async fn socket_to_stream<M: Meter>(
    mut socket: ReadHalf<'_>,
    tx: &mut Sending,
    prefix: Bytes,
    meter: &M,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut chunk = prefix;
    let mut reader = ChunkReader::new(READ_SIZE);
    loop {
        if chunk.is_empty() {
            chunk = reader.next(&mut socket).await?;
            if chunk.is_empty() {
                return tx.end().map(|()| total);
            }
            if chunk.len() >= reader.size() {
                reader.set_size(BULK_READ_SIZE);
            }
        }
        let len = chunk.len();
        std::future::poll_fn(|cx| tx.poll_send(cx, &mut chunk)).await?;
        let sent = len - chunk.len();
        meter.add(sent as u64);
        total += sent as u64;
    }
}

/// Writes every chunk the stream receives to the socket, half-closing it at the stream's end.
async fn stream_to_socket<N: Meter>(
    rx: &mut Receiving,
    mut socket: WriteHalf<'_>,
    meter: &N,
) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let Some(chunk) = std::future::poll_fn(|cx| rx.poll_chunk(cx)).await? else {
            let _ = socket.shutdown().await;
            return Ok(total);
        };
        socket.write_all(&chunk).await?;
        meter.add(chunk.len() as u64);
        total += chunk.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::proxy::test_support::{tcp_pair, write_and_half_close};
    use hyper::Response;
    use prometheus_client::metrics::counter::Counter;

    /// One CONNECT stream over plain HTTP/2 on loopback: (client end, server end).
    async fn connect_stream() -> (HboneStream, HboneStream) {
        let (client_io, server_io) = tcp_pair().await;
        let server = tokio::spawn(async move {
            let mut connection = h2::server::handshake(server_io).await.expect("server handshake");
            let (request, mut respond) = connection.accept().await.expect("a stream").expect("accepted");
            assert_eq!(request.method(), hyper::Method::CONNECT);
            let send = respond.send_response(Response::new(()), false).expect("respond");
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            HboneStream::new(send, request.into_body())
        });
        let (sender, connection) = h2::client::handshake(client_io).await.expect("client handshake");
        tokio::spawn(connection);
        let request = hyper::Request::connect("10.0.0.1:80").body(()).expect("request");
        let (response, send) =
            sender.ready().await.expect("ready").send_request(request, false).expect("send");
        let response = response.await.expect("response");
        (HboneStream::new(send, response.into_body()), server.await.expect("server"))
    }

    #[tokio::test]
    async fn relays_a_socket_over_a_stream_both_ways_with_prefixes_and_half_close() {
        let (client_end, mut server_end) = connect_stream().await;
        let (app, proxy_side) = tcp_pair().await;
        let (up, down) = (Counter::default(), Counter::default());
        let relay = tokio::spawn({
            let (up, down) = (up.clone(), down.clone());
            let socket = Prefixed::new(Bytes::from_static(b"socket-prefix:"), proxy_side);
            let stream = Prefixed::new(Bytes::from_static(b"stream-prefix:"), client_end);
            async move { relay_hbone(socket, stream, &up, &down).await }
        });
        // Far more than the initial 64 KiB window: flow control must be honoured both ways.
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let writer = write_and_half_close(app, payload.clone());
        let mut got = Vec::new();
        server_end.read_to_end(&mut got).await.expect("the far end reads to the end of stream");
        assert_eq!(&got[..14], b"socket-prefix:");
        assert!(got[14..] == payload[..], "every byte, in order");
        server_end.write_all(&payload[..100_000]).await.expect("write back");
        server_end.shutdown().await.expect("end of stream");
        let mut app = writer.await.expect("writer");
        let mut reply = Vec::new();
        app.read_to_end(&mut reply).await.expect("app reads");
        assert_eq!(&reply[..14], b"stream-prefix:");
        assert!(reply[14..] == payload[..100_000]);
        let (sent, received) = relay.await.expect("join").expect("relay");
        assert_eq!((sent, received), (3_000_014, 100_014));
        assert_eq!((up.get(), down.get()), (3_000_014, 100_014));
    }

    #[tokio::test]
    async fn a_stream_reset_by_the_peer_is_an_error() {
        let (client_end, server_end) = connect_stream().await;
        let (_app, proxy_side) = tcp_pair().await;
        let relay = tokio::spawn(async move {
            let (up, down) = (Counter::default(), Counter::default());
            relay_hbone(
                Prefixed::new(Bytes::new(), proxy_side),
                Prefixed::new(Bytes::new(), client_end),
                &up,
                &down,
            )
            .await
        });
        let HboneStream { mut tx, .. } = server_end;
        tx.send.send_reset(Reason::INTERNAL_ERROR);
        let result =
            tokio::time::timeout(std::time::Duration::from_secs(5), relay).await.expect("relay ends");
        let err = result.expect("join").expect_err("a reset stream is an error");
        assert!(err.to_string().contains("INTERNAL_ERROR") || err.to_string().contains("internal"), "{err}");
    }
}
