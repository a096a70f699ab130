//! The probes `connectivity-test` runs inside pods. meshctl re-executes itself
//! (`meshctl connectivity-test probe serve|connect …`, hidden) in a pod's netns and in a cgroup
//! under the node's pods cgroup, exactly where an app runs, so the node captures the probe's
//! traffic like any app's.
//!
//! The wire format is one header line, `MESHCTL-CONNTEST/1 <token> <id> <length>\n`, then
//! `length` bytes the server echoes back. The token is per run, so a client never counts an
//! echo from something else listening on the port; the id ties the server's record of a
//! connection (its peer address) to the client that made it. Both sides print one JSON line per
//! connection on stdout: the server a [`ServerEvent`], the client a [`ClientReport`].

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// What the header line starts with.
const MAGIC: &str = "MESHCTL-CONNTEST/1";
/// The largest stream a server accepts (a probe sends at most a few hundred KiB).
const MAX_LENGTH: usize = 16 << 20;
/// How long a server waits on a silent peer.
const SERVER_IDLE: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Subcommand)]
pub enum Role {
    /// Listens on a port and echoes every stream that carries the run's token.
    Serve(ServeArgs),
    /// Connects, sends a stream, verifies its echo, and prints the outcome.
    Connect(ConnectArgs),
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[arg(long)]
    pub port: u16,
    #[arg(long)]
    pub token: String,
}

#[derive(Debug, clap::Args)]
pub struct ConnectArgs {
    #[arg(long)]
    pub to: SocketAddr,
    #[arg(long)]
    pub token: String,
    /// Names this connection in the server's records.
    #[arg(long)]
    pub id: u64,
    /// Bytes to send (and get back).
    #[arg(long)]
    pub bytes: usize,
    /// The payload is this (hex) repeated: a marker the wire capture looks for.
    #[arg(long)]
    pub marker: String,
    /// Bounds the connect and then each read and write.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
}

/// The server's record of one connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerEvent {
    /// The client's id, when the header could be read.
    pub id: Option<u64>,
    /// The peer address the server saw (the client pod's, if the mesh preserves it).
    pub peer: String,
    /// Bytes echoed.
    pub bytes: u64,
    /// Why the stream was not fully echoed, if it was not.
    pub error: Option<String>,
}

/// How a client's connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every byte came back intact.
    Echoed,
    /// The connect was refused.
    Refused,
    /// The connection was reset.
    Reset,
    /// The peer closed before echoing everything.
    Closed,
    /// Nothing happened within the timeout.
    Timeout,
    /// Bytes came back, but not the ones sent.
    Corrupted,
    /// Anything else (the error says what).
    Error,
}

impl Outcome {
    /// Returns whether the mesh refused the connection outright (refused, reset, or closed
    /// with nothing echoed), as a denying policy does.
    pub fn is_refusal(self, bytes_echoed: u64) -> bool {
        matches!(self, Outcome::Refused | Outcome::Reset) || (self == Outcome::Closed && bytes_echoed == 0)
    }
}

/// The client's report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientReport {
    pub outcome: Outcome,
    pub bytes_echoed: u64,
    pub error: Option<String>,
    pub connect_ms: Option<u64>,
    pub total_ms: u64,
}

/// Runs a probe role; its result is what it prints.
pub fn run(role: Role) -> anyhow::Result<()> {
    match role {
        Role::Serve(args) => serve(&args),
        Role::Connect(args) => {
            let report = connect(&args)?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
    }
}

/// Returns `marker` repeated to `len` bytes.
pub fn payload(marker: &[u8], len: usize) -> Vec<u8> {
    marker.iter().copied().cycle().take(len).collect()
}

/// Decodes lowercase or uppercase hex.
pub fn from_hex(text: &str) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(text.len().is_multiple_of(2) && !text.is_empty(), "{text:?} is not hex bytes");
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).with_context(|| format!("{text:?} is not hex")))
        .collect()
}

/// Encodes bytes as lowercase hex.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a header line; `None` when it is not one of ours.
pub fn parse_header(line: &str) -> Option<(&str, u64, usize)> {
    let mut parts = line.trim_end_matches('\n').split(' ');
    let (magic, token, id, len) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if magic != MAGIC || parts.next().is_some() {
        return None;
    }
    Some((token, id.parse().ok()?, len.parse().ok().filter(|l| *l <= MAX_LENGTH)?))
}

fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], args.port))).with_context(|| {
        format!("listening on port {} (in use in this pod? pick another with --port)", args.port)
    })?;
    println!("LISTENING {}", args.port);
    std::io::stdout().flush()?;
    // meshctl holds our stdin: when it goes (meshctl ended, however), so do we.
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let token = args.token.clone();
        std::thread::spawn(move || {
            let event = echo(stream, &token);
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", serde_json::to_string(&event).unwrap_or_default());
            let _ = out.flush();
        });
    }
    Ok(())
}

/// Echoes one stream after checking its header.
fn echo(mut stream: TcpStream, token: &str) -> ServerEvent {
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let mut event = ServerEvent { id: None, peer, bytes: 0, error: None };
    let _ = stream.set_read_timeout(Some(SERVER_IDLE));
    let _ = stream.set_write_timeout(Some(SERVER_IDLE));
    let header = match read_line(&mut stream, 200) {
        Ok(line) => line,
        Err(err) => {
            event.error = Some(format!("reading the header: {err}"));
            return event;
        }
    };
    let Some((their_token, id, len)) = parse_header(&header) else {
        event.error = Some(format!("not a probe header: {:?}", header.chars().take(60).collect::<String>()));
        return event;
    };
    event.id = Some(id);
    if their_token != token {
        event.error = Some("another run's token".into());
        return event;
    }
    let mut buf = vec![0u8; 16 * 1024];
    while (event.bytes as usize) < len {
        let want = buf.len().min(len - event.bytes as usize);
        match stream.read(&mut buf[..want]) {
            Ok(0) => {
                event.error = Some(format!("the client closed after {} of {len} bytes", event.bytes));
                return event;
            }
            Ok(n) => {
                if let Err(err) = stream.write_all(&buf[..n]) {
                    event.error = Some(format!("echoing: {err}"));
                    return event;
                }
                event.bytes += n as u64;
            }
            Err(err) => {
                event.error = Some(format!("reading: {err}"));
                return event;
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
    event
}

/// Reads up to a newline (included), at most `max` bytes, byte by byte: the payload follows
/// the header at once and must stay in the socket for the echo loop.
fn read_line(stream: &mut TcpStream, max: usize) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < max && line.last() != Some(&b'\n') {
        if stream.read(&mut byte)? == 0 {
            break;
        }
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn connect(args: &ConnectArgs) -> anyhow::Result<ClientReport> {
    let marker = from_hex(&args.marker)?;
    if args.bytes > MAX_LENGTH {
        bail!("--bytes {} is over the {MAX_LENGTH} a server accepts", args.bytes);
    }
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let started = Instant::now();
    let report = |outcome, bytes_echoed, error: Option<String>, connect_ms| ClientReport {
        outcome,
        bytes_echoed,
        error,
        connect_ms,
        total_ms: started.elapsed().as_millis() as u64,
    };
    let mut stream = match TcpStream::connect_timeout(&args.to, timeout) {
        Ok(stream) => stream,
        Err(err) => return Ok(report(classify(&err), 0, Some(format!("connect: {err}")), None)),
    };
    let connect_ms = Some(started.elapsed().as_millis() as u64);
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let data = payload(&marker, args.bytes);
    let header = format!("{MAGIC} {} {} {}\n", args.token, args.id, args.bytes);
    // Writing and reading at once: the echo fills buffers both ways long before a large
    // stream is sent.
    let mut writer = stream.try_clone()?;
    let to_send = data.clone();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(header.as_bytes())?;
        for chunk in to_send.chunks(16 * 1024) {
            writer.write_all(chunk)?;
        }
        Ok(())
    });
    let mut echoed = 0usize;
    let mut buf = vec![0u8; 16 * 1024];
    let mut failure: Option<(Outcome, String)> = None;
    while echoed < data.len() {
        match stream.read(&mut buf) {
            Ok(0) => {
                failure = Some((Outcome::Closed, format!("closed after {echoed} of {} bytes", data.len())));
                break;
            }
            Ok(n) => {
                let end = (echoed + n).min(data.len());
                if buf[..end - echoed] != data[echoed..end] || echoed + n > data.len() {
                    failure = Some((Outcome::Corrupted, format!("the echo differs from byte {echoed} on")));
                    break;
                }
                echoed = end;
            }
            Err(err) => {
                failure = Some((classify(&err), format!("after {echoed} bytes: {err}")));
                break;
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    let sent = sender.join().map_err(|_| anyhow::anyhow!("the sending thread panicked"))?;
    let echoed = echoed as u64;
    Ok(match (failure, sent) {
        (Some((outcome, why)), _) => report(outcome, echoed, Some(why), connect_ms),
        (None, Err(err)) => report(classify(&err), echoed, Some(format!("sending: {err}")), connect_ms),
        (None, Ok(())) => report(Outcome::Echoed, echoed, None, connect_ms),
    })
}

fn classify(err: &std::io::Error) -> Outcome {
    use std::io::ErrorKind;
    match err.kind() {
        ErrorKind::ConnectionRefused => Outcome::Refused,
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => Outcome::Reset,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Outcome::Timeout,
        ErrorKind::UnexpectedEof => Outcome::Closed,
        _ => Outcome::Error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_strangers_are_refused() {
        assert_eq!(parse_header("MESHCTL-CONNTEST/1 abc 7 100\n"), Some(("abc", 7, 100)));
        assert_eq!(parse_header("GET / HTTP/1.1\r\n"), None);
        assert_eq!(parse_header("MESHCTL-CONNTEST/1 abc 7 100 extra\n"), None);
        assert_eq!(parse_header(&format!("MESHCTL-CONNTEST/1 abc 7 {}\n", MAX_LENGTH + 1)), None);
        assert_eq!(from_hex(&to_hex(&[0, 1, 0xfe])).unwrap(), [0, 1, 0xfe]);
        assert!(from_hex("zz").is_err() && from_hex("abc").is_err());
        assert_eq!(payload(b"ab", 5), b"ababa");
    }

    #[test]
    fn refusals_are_what_a_deny_looks_like() {
        assert!(Outcome::Reset.is_refusal(0));
        assert!(Outcome::Refused.is_refusal(0));
        assert!(Outcome::Closed.is_refusal(0));
        assert!(!Outcome::Closed.is_refusal(10), "a stream cut midway is not a refusal");
        assert!(!Outcome::Timeout.is_refusal(0), "silence is not a refusal");
    }

    /// A server and a client on loopback: the echo is verified, another run's token is not
    /// echoed, and the server records the peer and the id.
    #[test]
    fn a_client_gets_its_stream_back_from_a_server_with_its_token() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            (0..2).map(|_| echo(listener.accept().unwrap().0, "tok")).collect::<Vec<_>>()
        });
        let args = |token: &str, id| ConnectArgs {
            to: addr,
            token: token.into(),
            id,
            bytes: 300_000,
            marker: "00ff10".into(),
            timeout_ms: 5000,
        };
        let good = connect(&args("tok", 1)).unwrap();
        assert_eq!((good.outcome, good.bytes_echoed), (Outcome::Echoed, 300_000), "{good:?}");
        let stranger = connect(&args("other", 2)).unwrap();
        assert!(stranger.outcome != Outcome::Echoed, "{stranger:?}");
        let events = server.join().unwrap();
        assert_eq!(events[0].id, Some(1));
        assert_eq!(events[0].bytes, 300_000);
        assert!(events[0].peer.starts_with("127.0.0.1:"), "{events:?}");
        assert_eq!(events[1].error.as_deref(), Some("another run's token"));
    }
}
