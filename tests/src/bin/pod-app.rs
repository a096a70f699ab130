//! pod-app: the application the end-to-end tests and the demo run inside pods.
//!
//! `serve` accepts connections, first tells each client the peer address it sees (`PEER ip:port`),
//! then echoes everything until EOF. `client` opens many concurrent connections, streams a
//! deterministic pseudo-random payload on each while reading the echo back, verifies every byte,
//! and prints one JSON report.
//!
//! For throughput (`cargo xtask bench`), `sink` receives one-way streams of a seeded pattern and
//! verifies every byte, and `send` streams that pattern on one or more connections for a while
//! and reports how many bytes the sink verified, and how long it took, as JSON.
//!
//! For L7 (`nodemesh_testbed::http_app`): `http-serve` answers HTTP/1.1 and h2c with JSON
//! naming itself and what it saw, `http-client` sends keep-alive or multiplexed requests and
//! prints one JSON report, and `raw` writes stdin as-is on one TCP connection and reports the
//! responses (for malformed requests).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use nodemesh_testbed::{
    http_app::{
        client::ClientConfig,
        raw,
        server::{Framing, ServerConfig},
    },
    payload::{Pattern, Stream},
    report::{ClientReport, SendReport},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};

#[derive(Debug, Parser)]
#[command(name = "pod-app", about = "nodemesh test application")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Echo server that first reports the peer address it sees.
    Serve {
        #[arg(long)]
        port: u16,
    },
    /// Concurrent verifying client; prints a JSON report.
    Client {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1024)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        conns: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 5000)]
        connect_timeout_ms: u64,
        /// Overall deadline for each connection's transfer.
        #[arg(long, default_value_t = 120_000)]
        timeout_ms: u64,
        /// Spread the sending over this long (a long-lived, slow stream); 0 = as fast as possible.
        #[arg(long, default_value_t = 0)]
        duration_ms: u64,
    },
    /// Receives `send` streams, verifies every byte and answers `OK <bytes>` at the end.
    Sink {
        #[arg(long)]
        port: u16,
        /// Stop reading for this long after each stream's header (a slow receiver: the sender
        /// must be held back, not buffered for without limit).
        #[arg(long, default_value_t = 0)]
        stall_ms: u64,
    },
    /// Streams a seeded pattern one way to a `sink`; prints a JSON report.
    Send {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        conns: u32,
        /// How long each connection sends.
        #[arg(long)]
        duration_ms: u64,
        /// Wait this long after the header before streaming (a connection that is quiet first).
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 5000)]
        connect_timeout_ms: u64,
    },
    /// HTTP/1.1 and h2c server answering JSON (who answered, what it saw); `x-server: NAME`.
    HttpServe {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "pod-app")]
        name: String,
        /// Answer 503 to the first N requests (counted per `x-fail-key` request header).
        #[arg(long, default_value_t = 0)]
        fail_first: u64,
        /// Delay every answer (a request's `x-delay-ms` header overrides it).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Answer with this status (changed at run time by `/admin/status?code=S`).
        #[arg(long, default_value_t = 200)]
        status: u16,
        /// `standard` (hyper), or a lenient HTTP/1.1 parser fooled by ambiguous framing, for
        /// smuggling tests: `first-content-length` or `chunked-keep-alive`.
        #[arg(long, default_value = "standard")]
        framing: Framing,
    },
    /// HTTP client: N requests over C workers (keep-alive, or one h2c connection); JSON report.
    HttpClient {
        /// `http://IP[:PORT]/path?query`.
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 1)]
        requests: u32,
        #[arg(long, default_value_t = 1)]
        concurrency: u32,
        /// Prior-knowledge HTTP/2 (h2c), every request multiplexed over one connection.
        #[arg(long)]
        http2: bool,
        #[arg(long, default_value = "GET")]
        method: String,
        /// A request header `name:value` (repeatable).
        #[arg(long = "header", value_name = "NAME:VALUE")]
        headers: Vec<String>,
        /// Send a body of this many bytes with every request.
        #[arg(long, default_value_t = 0)]
        body_bytes: usize,
        /// Per request, including connecting and reading the body.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// For the whole run: requests not started by then are not sent (counted as errors).
        #[arg(long, default_value_t = 60_000)]
        deadline_ms: u64,
        /// Report every request.
        #[arg(long)]
        verbose: bool,
    },
    /// Writes stdin as-is to one TCP connection and reports the HTTP/1.x responses (JSON).
    Raw {
        #[arg(long)]
        to: SocketAddr,
        /// Stop reading after this long without data.
        #[arg(long, default_value_t = 1000)]
        idle_ms: u64,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
}

fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    raise_fd_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("pod-app: cannot start runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve { port } => serve(port).await,
            Command::Client { to, bytes, conns, seed, connect_timeout_ms, timeout_ms, duration_ms } => {
                let timing = Timing {
                    connect: Duration::from_millis(connect_timeout_ms),
                    overall: Duration::from_millis(timeout_ms),
                    spread: Duration::from_millis(duration_ms),
                };
                let report = client(to, bytes, conns, seed, timing).await;
                println!("{}", serde_json::to_string(&report)?);
                Ok(())
            }
            Command::Sink { port, stall_ms } => sink(port, Duration::from_millis(stall_ms)).await,
            Command::Send { to, conns, duration_ms, pause_ms, seed, connect_timeout_ms } => {
                let (duration, connect) =
                    (Duration::from_millis(duration_ms), Duration::from_millis(connect_timeout_ms));
                let report =
                    send(to, conns, (Duration::from_millis(pause_ms), duration), seed, connect).await;
                println!("{}", serde_json::to_string(&report)?);
                Ok(())
            }
            Command::HttpServe { port, name, fail_first, delay_ms, status, framing } => {
                let listener =
                    listen(port).map_err(|err| anyhow::anyhow!("cannot listen on 0.0.0.0:{port}: {err}"))?;
                println!("LISTENING {}", listener.local_addr()?.port());
                let delay = Duration::from_millis(delay_ms);
                let config = ServerConfig { name, fail_first, delay, status, framing };
                Ok(nodemesh_testbed::http_app::server::serve(listener, config).await?)
            }
            Command::HttpClient {
                url,
                requests,
                concurrency,
                http2,
                method,
                headers,
                body_bytes,
                timeout_ms,
                deadline_ms,
                verbose,
            } => {
                let mut config = ClientConfig::for_url(&url).map_err(anyhow::Error::msg)?;
                config.method = method.parse().map_err(|_| anyhow::anyhow!("bad method {method:?}"))?;
                for header in &headers {
                    config.add_header(header).map_err(anyhow::Error::msg)?;
                }
                (config.requests, config.concurrency, config.http2) = (requests, concurrency, http2);
                (config.body_bytes, config.verbose) = (body_bytes, verbose);
                (config.timeout, config.deadline) =
                    (Duration::from_millis(timeout_ms), Duration::from_millis(deadline_ms));
                let report = nodemesh_testbed::http_app::client::run(config).await;
                println!("{}", serde_json::to_string(&report)?);
                Ok(())
            }
            Command::Raw { to, idle_ms, timeout_ms } => {
                let mut request = Vec::new();
                tokio::io::stdin().read_to_end(&mut request).await?;
                let (idle, overall) = (Duration::from_millis(idle_ms), Duration::from_millis(timeout_ms));
                let report = raw::exchange(to, &request, idle, overall).await;
                println!("{}", serde_json::to_string(&report)?);
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("pod-app: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(port: u16) -> anyhow::Result<()> {
    let listener = listen(port).map_err(|err| anyhow::anyhow!("cannot listen on 0.0.0.0:{port}: {err}"))?;
    // The test bed waits for this line before it starts clients; with `--port 0` it says which.
    println!("LISTENING {}", listener.local_addr()?.port());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                eprintln!("pod-app: accept: {err}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            if let Err(err) = echo(stream, peer).await {
                eprintln!("pod-app: connection from {peer}: {err}");
            }
        });
    }
}

/// Opens the listener with a deep accept queue. The server speaks first (the PEER line), so a
/// connection whose final ACK the kernel dropped on a full queue would wait for that line until
/// the client gives up; tokio's default backlog (1,024) is too short for 1,000+ simultaneous
/// connects on a busy machine. The kernel caps the backlog at `net.core.somaxconn`.
fn listen(port: u16) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
    socket.listen(65_535)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

async fn echo(mut stream: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    stream.write_all(format!("PEER {peer}\n").as_bytes()).await?;
    let (mut read, mut write) = stream.split();
    tokio::io::copy(&mut read, &mut write).await?;
    write.shutdown().await
}

/// How long things may take, and how long the sending is spread over.
#[derive(Clone, Copy, Debug)]
struct Timing {
    connect: Duration,
    overall: Duration,
    spread: Duration,
}

struct ConnResult {
    sent: u64,
    received: u64,
    peer: String,
}

async fn client(to: SocketAddr, bytes: u64, conns: u32, seed: u64, timing: Timing) -> ClientReport {
    let timeout = timing.overall;
    let started = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|i| {
            tokio::spawn(async move {
                match tokio::time::timeout(
                    timeout,
                    one_connection(to, bytes, seed.wrapping_add(u64::from(i)), timing),
                )
                .await
                {
                    Ok(result) => result,
                    Err(_) => Err(format!("transfer timed out after {timeout:?}")),
                }
            })
        })
        .collect();
    let mut report = ClientReport { conns, ..ClientReport::default() };
    for task in tasks {
        match task.await {
            Ok(Ok(r)) => {
                report.succeeded += 1;
                report.bytes_sent += r.sent;
                report.bytes_received += r.received;
                if !report.peers_seen.contains(&r.peer) {
                    report.peers_seen.push(r.peer);
                }
            }
            Ok(Err(err)) => {
                report.failed += 1;
                if report.errors.len() < 5 {
                    report.errors.push(err);
                }
            }
            Err(err) => {
                report.failed += 1;
                report.errors.push(format!("task failed: {err}"));
            }
        }
    }
    report.ok = report.failed == 0 && report.succeeded == conns;
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    report
}

async fn one_connection(to: SocketAddr, bytes: u64, seed: u64, timing: Timing) -> Result<ConnResult, String> {
    let connect_timeout = timing.connect;
    let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(to)).await {
        Ok(Ok(s)) => s,
        Ok(Err(err)) => return Err(format!("connect {to}: {err}")),
        Err(_) => return Err(format!("connect {to}: timed out after {connect_timeout:?}")),
    };
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = String::new();
    read.read_line(&mut line).await.map_err(|e| format!("reading PEER line: {e}"))?;
    let peer = line
        .strip_prefix("PEER ")
        .map(|p| p.trim().to_owned())
        .ok_or_else(|| format!("expected a PEER line, got {line:?}"))?;
    let sender = async move {
        let mut stream = Stream::new(seed);
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = bytes;
        let chunks = bytes.div_ceil(buf.len() as u64).max(1);
        let pause = timing.spread / u32::try_from(chunks).unwrap_or(u32::MAX);
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            stream.fill(&mut buf[..n]);
            write.write_all(&buf[..n]).await.map_err(|e| format!("send: {e}"))?;
            left -= n as u64;
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        write.shutdown().await.map_err(|e| format!("half-close: {e}"))?;
        Ok::<u64, String>(bytes)
    };
    let checker = async move {
        let mut expected = Stream::new(seed);
        let mut got = vec![0u8; 64 * 1024];
        let mut want = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = read.read(&mut got).await.map_err(|e| format!("receive after {total} bytes: {e}"))?;
            if n == 0 {
                break;
            }
            expected.fill(&mut want[..n]);
            if got[..n] != want[..n] {
                return Err(format!(
                    "echo differs from what was sent within bytes {total}..{}",
                    total + n as u64
                ));
            }
            total += n as u64;
        }
        if total != bytes {
            return Err(format!("echo ended after {total} of {bytes} bytes"));
        }
        Ok(total)
    };
    let (sent, received) = tokio::try_join!(sender, checker)?;
    Ok(ConnResult { sent, received, peer })
}

/// The most a `send` or `sink` moves per system call.
const CHUNK: usize = 256 * 1024;

async fn sink(port: u16, stall: Duration) -> anyhow::Result<()> {
    let listener = listen(port).map_err(|err| anyhow::anyhow!("cannot listen on 0.0.0.0:{port}: {err}"))?;
    println!("LISTENING {}", listener.local_addr()?.port());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                eprintln!("pod-app: accept: {err}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            if let Err(err) = receive(stream, stall).await {
                eprintln!("pod-app: stream from {peer}: {err}");
            }
        });
    }
}

/// Reads `SEND <seed>\n` and then the pattern of that seed until EOF, checking every byte, and
/// answers `OK <bytes>` (or `BAD <offset>` at the first wrong byte, and stops reading).
async fn receive(stream: TcpStream, stall: Duration) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::with_capacity(CHUNK, read);
    let mut header = String::new();
    read.read_line(&mut header).await?;
    let Some(seed) = header.strip_prefix("SEND ").and_then(|s| s.trim().parse::<u64>().ok()) else {
        write.write_all(b"BAD header\n").await?;
        return Ok(());
    };
    let pattern = Pattern::new(seed);
    tokio::time::sleep(stall).await;
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = read.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        if !pattern.matches(total, &buf[..n]) {
            write.write_all(format!("BAD {total}\n").as_bytes()).await?;
            return Ok(());
        }
        total += n as u64;
    }
    write.write_all(format!("OK {total}\n").as_bytes()).await?;
    write.shutdown().await
}

/// `timing`: the pause after the header, and how long to stream.
async fn send(
    to: SocketAddr,
    conns: u32,
    timing: (Duration, Duration),
    seed: u64,
    connect: Duration,
) -> SendReport {
    let duration = timing.0 + timing.1;
    let started = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|i| {
            let seed = seed.wrapping_add(u64::from(i));
            // Generous: the sink may still be draining buffers when the sending stops.
            let limit = connect + duration + Duration::from_secs(60);
            tokio::spawn(async move {
                match tokio::time::timeout(limit, send_one(to, timing, seed, connect)).await {
                    Ok(result) => result,
                    Err(_) => Err(format!("stream timed out after {limit:?}")),
                }
            })
        })
        .collect();
    let mut report = SendReport { conns, ..SendReport::default() };
    for task in tasks {
        match task.await {
            Ok(Ok((sent, verified))) => {
                report.succeeded += 1;
                report.bytes_sent += sent;
                report.bytes_verified += verified;
            }
            Ok(Err(err)) => {
                report.failed += 1;
                if report.errors.len() < 5 {
                    report.errors.push(err);
                }
            }
            Err(err) => {
                report.failed += 1;
                report.errors.push(format!("task failed: {err}"));
            }
        }
    }
    report.elapsed_us = started.elapsed().as_micros() as u64;
    report.ok = report.failed == 0 && report.succeeded == conns && report.bytes_sent == report.bytes_verified;
    report
}

/// Streams the pattern of `seed` for `duration`, half-closes, and returns (bytes sent, bytes
/// the sink verified).
async fn send_one(
    to: SocketAddr,
    (pause, duration): (Duration, Duration),
    seed: u64,
    connect: Duration,
) -> Result<(u64, u64), String> {
    let stream = match tokio::time::timeout(connect, TcpStream::connect(to)).await {
        Ok(Ok(s)) => s,
        Ok(Err(err)) => return Err(format!("connect {to}: {err}")),
        Err(_) => return Err(format!("connect {to}: timed out after {connect:?}")),
    };
    let (read, mut write) = stream.into_split();
    write.write_all(format!("SEND {seed}\n").as_bytes()).await.map_err(|e| format!("send: {e}"))?;
    tokio::time::sleep(pause).await;
    let pattern = Pattern::new(seed);
    let deadline = Instant::now() + duration;
    let mut sent = 0u64;
    while Instant::now() < deadline {
        let chunk = pattern.chunk(sent, CHUNK);
        write.write_all(chunk).await.map_err(|e| format!("send after {sent} bytes: {e}"))?;
        sent += chunk.len() as u64;
    }
    write.shutdown().await.map_err(|e| format!("half-close: {e}"))?;
    let mut verdict = String::new();
    BufReader::new(read).read_line(&mut verdict).await.map_err(|e| format!("reading the verdict: {e}"))?;
    match verdict.trim().strip_prefix("OK ").and_then(|n| n.parse::<u64>().ok()) {
        Some(verified) if verified == sent => Ok((sent, verified)),
        Some(verified) => Err(format!("the sink verified {verified} of {sent} bytes")),
        None if verdict.is_empty() => Err(format!("the sink closed without a verdict after {sent} bytes")),
        None => Err(format!("the sink answered {:?} after {sent} bytes", verdict.trim())),
    }
}
