//! Connection clients that run inside the client pod, started by the harness like the load
//! generator: `xtask-bench connect` opens new connections back to back (the connection setup
//! rate through the mesh), `xtask-bench hold` opens many and keeps them open while the harness
//! measures the proxies' memory.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::histogram::Histogram;

/// What each connection of a connection-rate run sends and expects back.
const PROBE: &[u8; 16] = b"nodemesh-bench!\n";

/// What `xtask-bench connect` prints.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ConnectReport {
    /// Connections that completed the whole exchange, verified.
    pub completed: u64,
    pub failed: u64,
    pub elapsed_us: u64,
    /// Completed connections per second.
    pub per_second: f64,
    /// Time from `connect` to the server's greeting (the whole path set up), p50 and p99.
    pub setup_p50_us: f64,
    pub setup_p99_us: f64,
    pub errors: Vec<String>,
}

/// One connection of a rate run: connect, read pod-app's greeting, send the probe, half-close,
/// and check the echo and the end of the stream. Returns the time to the greeting.
fn one(to: SocketAddr) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let stream =
        TcpStream::connect_timeout(&to, Duration::from_secs(5)).with_context(|| format!("connect {to}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line).context("reading the greeting")?;
    anyhow::ensure!(line.starts_with("PEER "), "expected a PEER greeting, got {line:?}");
    let setup = started.elapsed();
    (&stream).write_all(PROBE).context("sending")?;
    stream.shutdown(std::net::Shutdown::Write).context("half-close")?;
    let mut echo = Vec::new();
    reader.read_to_end(&mut echo).context("reading the echo")?;
    anyhow::ensure!(echo == PROBE, "the echo was {} bytes, not the probe", echo.len());
    Ok(setup)
}

/// Opens connections back to back from `workers` threads for `duration` or until `max` are
/// done, and reports the rate. Failures are counted, not fatal: the harness decides.
pub fn rate(to: SocketAddr, workers: u32, duration: Duration, max: u64) -> ConnectReport {
    let started = Instant::now();
    let deadline = started + duration;
    let claimed = AtomicU64::new(0);
    let results: Vec<(Histogram, u64, Vec<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let claimed = &claimed;
                s.spawn(move || {
                    let (mut setup, mut failed, mut errors) = (Histogram::default(), 0u64, Vec::new());
                    while Instant::now() < deadline && claimed.fetch_add(1, Ordering::Relaxed) < max {
                        match one(to) {
                            Ok(took) => setup.record(took),
                            Err(err) => {
                                failed += 1;
                                if errors.len() < 3 {
                                    errors.push(format!("{err:#}"));
                                }
                            }
                        }
                    }
                    (setup, failed, errors)
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let elapsed = started.elapsed();
    let mut report = ConnectReport { elapsed_us: elapsed.as_micros() as u64, ..ConnectReport::default() };
    let mut setup = Histogram::default();
    for (h, failed, errors) in results {
        setup.merge(&h);
        report.failed += failed;
        report.errors.extend(errors);
    }
    report.errors.truncate(5);
    report.completed = setup.len();
    report.per_second = setup.len() as f64 / elapsed.as_secs_f64();
    report.setup_p50_us = setup.percentile(50.0).as_secs_f64() * 1e6;
    report.setup_p99_us = setup.percentile(99.0).as_secs_f64() * 1e6;
    report
}

/// Opens `count` connections (each greeted by the server, so the whole path exists) from 16
/// threads, prints `HELD <count>`, keeps them open until standard input closes, then closes
/// them. Fails if any cannot be opened.
pub fn hold(to: SocketAddr, count: u32) -> anyhow::Result<()> {
    const THREADS: u32 = 16;
    let held: Vec<TcpStream> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                s.spawn(move || -> anyhow::Result<Vec<TcpStream>> {
                    let mine = count / THREADS + u32::from(t < count % THREADS);
                    let mut streams = Vec::with_capacity(mine as usize);
                    for _ in 0..mine {
                        let stream = TcpStream::connect_timeout(&to, Duration::from_secs(10))
                            .with_context(|| format!("connect {to} (after {} held)", streams.len()))?;
                        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
                        let mut line = String::new();
                        BufReader::new(&stream).read_line(&mut line).context("reading the greeting")?;
                        anyhow::ensure!(line.starts_with("PEER "), "expected a PEER greeting, got {line:?}");
                        streams.push(stream);
                    }
                    Ok(streams)
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.join().map_err(|_| anyhow::anyhow!("a connecting thread panicked"))??);
        }
        Ok::<_, anyhow::Error>(all)
    })?;
    println!("HELD {}", held.len());
    std::io::stdout().flush()?;
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    drop(held);
    Ok(())
}
